"""Tensor parallelism on CPU with gloo: sharded engines give tp=1's logits and greedy tokens, shards reassemble
to the original tensors, unshardable configs are refused, and no worker process outlives its engine."""
from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from llmc import LLM, SamplingParams
from llmc.build.builder import build
from llmc.build.sharding import shard_tensor, tp_layout
from llmc.config import BuildConfig, ModelConfig
from llmc.errors import CheckpointError, ConfigError
from llmc.runtime.engine import LLMEngine
from llmc.runtime.model_runner import ScheduledSeq
from llmc.runtime.sequence import Sequence

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tp_engines(tiny_factory, tmp_path_factory):
    """(tp=1 engine, tp=size engine) per (variant, size), built once."""
    cache: dict = {}

    def get(kind: str, size: int):
        if (kind, size) not in cache:
            _, eng1 = tiny_factory(kind)
            out = tmp_path_factory.mktemp(f"tp{size}-{kind}") / "engine"
            cache[kind, size] = eng1, build(eng1.parent / "ckpt", out, BuildConfig(
                max_batch_size=16, max_seq_len=256, max_num_tokens=64, tp_size=size))
        return cache[kind, size]

    return get


def tp_children() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("llmc-tp")]


def greedy(engine: LLMEngine, prompts):
    reqs = [engine.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=12, logprobs=0,
                                                                         ignore_eos=True)) for p in prompts]
    while engine.has_unfinished_requests():
        engine.step()
    outs = [r.final_output().outputs[0] for r in reqs]
    return [o.token_ids for o in outs], [o.cumulative_logprob for o in outs]


def logits(engine: LLMEngine, ids):
    seq = Sequence("x", ids, SamplingParams())
    assert engine.kv.allocate_slots(seq, len(ids))
    out = engine.runner.forward([ScheduledSeq(seq, len(ids), True)], logit_rows=list(range(len(ids))))
    engine.kv.free(seq)
    return out


@pytest.mark.parametrize("kind,size", [("llama-gqa", 2), ("llama-gqa", 4), ("llama-tied", 2), ("llama-tied", 4),
                                       ("qwen2-bias", 2), ("qwen2-bias", 4)])
def test_tp_matches_single_rank(tp_engines, kind, size):
    eng1, engn = tp_engines(kind, size)
    rng = random.Random(size)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(1, 70))] for _ in range(6)]
    one = LLMEngine(eng1, show_progress=False)
    tp = LLMEngine(engn, show_progress=False)
    try:
        assert tp.runner.num_kv_blocks > 0 and tp.runner.device.type == "cpu"
        assert tp.runner.model.embed_tokens.num_embeddings == 384 // size  # rank 0 holds its vocab shard
        torch.testing.assert_close(logits(tp, prompts[0]), logits(one, prompts[0]), atol=1e-4, rtol=1e-4)
        tokens_tp, lp_tp = greedy(tp, prompts)  # prefill chunks and decodes mixed (max_num_tokens=64)
        tokens_one, lp_one = greedy(one, prompts)
        assert tokens_tp == tokens_one
        assert lp_tp == pytest.approx(lp_one, abs=1e-3)  # the sampled rows' logits agree at every step
        assert tp.kv.num_used_blocks == 0
    finally:
        tp.shutdown()
    assert tp_children() == []


def test_llm_api_sampling_and_copy_on_write(tp_engines):
    """n>1 forks a sequence (copy-on-write of its partial block) and seeded sampling must draw the same."""
    eng1, eng2 = tp_engines("qwen2-bias", 2)
    prompts = [[5, 6, 7, 8, 9] * 7, [11, 12, 13] * 9]
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=10, ignore_eos=True)
    expect = LLM(eng1, show_progress=False).generate(prompt_token_ids=prompts, sampling_params=params,
                                                     use_tqdm=False)
    llm = LLM(eng2, show_progress=False)
    sent = []
    copy_blocks = llm.engine.runner.copy_blocks
    llm.engine.runner.copy_blocks = lambda pairs: (sent.extend(pairs), copy_blocks(pairs))
    try:
        got = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert sent, "the workload did not exercise copy-on-write"
    assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in expect]
    assert tp_children() == []


def test_dead_worker_fails_the_step_instead_of_hanging(tp_engines):
    _, eng2 = tp_engines("llama-gqa", 2)
    engine = LLMEngine(eng2, show_progress=False)
    worker = engine.runner.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    engine.add_request(prompt_token_ids=[3, 4, 5], params=SamplingParams(max_tokens=4))
    result: list = []

    def step():
        try:
            engine.step()
            result.append(None)
        except Exception as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=step, daemon=True)
    t.start()
    t.join(60)
    assert result and isinstance(result[0], RuntimeError) and "tensor-parallel" in str(result[0])
    engine.shutdown()
    assert tp_children() == []


def test_worker_startup_error_is_reported(tp_engines, tmp_path):
    _, eng2 = tp_engines("llama-gqa", 2)
    bad = tmp_path / "engine"
    shutil.copytree(eng2, bad)
    for f in bad.glob("rank1-*.safetensors"):
        f.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="rank 1"):
        LLMEngine(bad, show_progress=False)
    assert tp_children() == []
    one_after = LLMEngine(eng2, show_progress=False)  # the process group was released
    one_after.shutdown()


def _orphans(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if "\nState:\tZ" not in state:
            alive.append(pid)
    return alive


SCRIPT = textwrap.dedent("""
    import sys, time
    from llmc.runtime.engine import LLMEngine
    if __name__ == "__main__":
        e = LLMEngine(sys.argv[1], show_progress=False)
        print(" ".join(str(p.pid) for p in e.runner.procs), flush=True)
        if sys.argv[2] == "hang":
            time.sleep(600)
""")


@pytest.mark.parametrize("how", ["exit", "killed"])
def test_no_orphan_workers(tp_engines, tmp_path, how):
    """Leaving without shutdown() (atexit stops the workers) or dying by SIGKILL (workers watch their parent)."""
    _, eng2 = tp_engines("llama-tied", 4)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(eng2), "exit" if how == "exit" else "hang"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 3
    if how == "killed":
        proc.kill()
    assert proc.wait(timeout=120) == (0 if how == "exit" else -signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _orphans(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _orphans(pids) == []


# ---------------------------------------------------------------------------------------------- sharding units
def _cfg(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=6, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("hkv,size", [(4, 2), (2, 2), (2, 4), (1, 2), (1, 4), (4, 4)])
def test_qkv_shards_hold_their_heads(hkv, size):
    cfg = _cfg(num_key_value_heads=hkv, intermediate_size=8)
    d, group = cfg.head_dim, cfg.num_attention_heads // hkv
    qkv = torch.randn(cfg.q_size + 2 * cfg.kv_size, 8)
    bias = qkv[:, 0].clone()  # a bias splits like the weight's rows
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
    qs, ks, vs = [], [], []
    for r in range(size):
        lay = tp_layout(cfg, r, size)
        w = shard_tensor("layers.0.self_attn.qkv_proj.weight", qkv, cfg, lay)
        b = shard_tensor("layers.0.self_attn.qkv_proj.bias", bias, cfg, lay)
        assert w.shape[0] == (lay.q_heads + 2 * lay.kv_heads) * d == b.shape[0]
        assert torch.equal(b, w[:, 0])
        qr, kr, vr = w.split([lay.q_heads * d, lay.kv_heads * d, lay.kv_heads * d])
        qs.append(qr)
        # every local query head's KV head (global index h // group) is the local one it maps to
        for i in range(lay.q_heads):
            h = r * lay.q_heads + i
            local_kv = i // (lay.q_heads // lay.kv_heads)
            assert torch.equal(kr[local_kv * d:(local_kv + 1) * d], k[(h // group) * d:(h // group + 1) * d])
            assert torch.equal(vr[local_kv * d:(local_kv + 1) * d], v[(h // group) * d:(h // group + 1) * d])
        if hkv >= size:
            ks.append(kr)
            vs.append(vr)
    assert torch.equal(torch.cat(qs), q)
    if hkv >= size:  # not replicated: the KV shards concatenate to the original
        assert torch.equal(torch.cat(ks), k) and torch.equal(torch.cat(vs), v)


def test_mlp_embedding_and_row_parallel_shards_concatenate_to_the_original():
    cfg = _cfg(mlp_bias=True)
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(12, 8, generator=g)
    down, down_b = torch.randn(8, 6, generator=g), torch.randn(8, generator=g)
    o = torch.randn(8, cfg.q_size, generator=g)
    emb = torch.randn(10, 8, generator=g)
    norm = torch.randn(8, generator=g)
    lays = [tp_layout(cfg, r, 2) for r in range(2)]
    gu = [shard_tensor("layers.0.mlp.gate_up_proj.weight", gate_up, cfg, lay) for lay in lays]
    assert torch.equal(torch.cat([p[:3] for p in gu]), gate_up[:6])  # gate
    assert torch.equal(torch.cat([p[3:] for p in gu]), gate_up[6:])  # up
    parts = [shard_tensor("layers.0.mlp.down_proj.weight", down, cfg, lay) for lay in lays]
    assert torch.equal(torch.cat(parts, dim=1), down)
    parts = [shard_tensor("layers.0.self_attn.o_proj.weight", o, cfg, lay) for lay in lays]
    assert torch.equal(torch.cat(parts, dim=1), o)
    biases = [shard_tensor("layers.0.mlp.down_proj.bias", down_b, cfg, lay) for lay in lays]
    assert torch.equal(biases[0], down_b) and not biases[1].any()  # the all-reduce adds it once
    parts = [shard_tensor("embed_tokens.weight", emb, cfg, lay) for lay in lays]
    assert torch.equal(torch.cat(parts), emb)
    for name in ("norm.weight", "layers.0.input_layernorm.weight"):
        assert all(torch.equal(shard_tensor(name, norm, cfg, lay), norm) for lay in lays)
    cfg3 = _cfg(num_attention_heads=3, num_key_value_heads=3)  # 3 ranks: the vocab of 10 pads to 12
    parts = [shard_tensor("lm_head.weight", emb, cfg3, tp_layout(cfg3, r, 3)) for r in range(3)]
    assert all(p.shape == (4, 8) for p in parts)
    assert torch.equal(torch.cat(parts)[:10], emb) and not torch.cat(parts)[10:].any()


@pytest.mark.parametrize("kw,size,match", [
    ({}, 3, "num_attention_heads"),
    ({"num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 6}, 4, "intermediate_size"),
    ({"num_attention_heads": 12, "num_key_value_heads": 6, "intermediate_size": 8}, 4, "num_key_value_heads"),
    ({"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 6}, 3, "multiple of 2"),
])
def test_unshardable_sizes_refused(kw, size, match):
    with pytest.raises(ConfigError, match=match):
        tp_layout(_cfg(**kw), 0, size)


def test_build_refuses_bad_tp_and_quantized(tiny_factory, tmp_path):
    _, eng1 = tiny_factory("llama-gqa")
    ckpt = eng1.parent / "ckpt"
    with pytest.raises(ConfigError, match="num_attention_heads"):
        build(ckpt, tmp_path / "e3", BuildConfig(max_batch_size=16, max_seq_len=256, max_num_tokens=64, tp_size=3))
    with pytest.raises(ConfigError, match="quantized"):
        build(ckpt, tmp_path / "eq", BuildConfig(max_batch_size=16, max_seq_len=256, max_num_tokens=64, tp_size=2),
              quant="int8")
    assert not (tmp_path / "eq").exists() and not (tmp_path / "e3").exists()
