"""Tensor parallelism on CPU with gloo: sharded engines give tp=1's logits and greedy tokens."""
from __future__ import annotations

import random

import pytest
import torch

from llmc.build.builder import build
from llmc.build.sharding import shard_tensor, tp_layout
from llmc.config import BuildConfig, ModelConfig
from llmc.errors import ConfigError
from llmc.runtime.engine import LLMEngine
from llmc.runtime.model_runner import ScheduledSeq
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence


def tp_engine(tiny_factory, tmp_path_factory, kind: str, size: int):
    hf, eng1 = tiny_factory(kind)
    ckpt = eng1.parent / "ckpt"
    out = tmp_path_factory.mktemp(f"tp{size}-{kind}") / "engine"
    return eng1, build(ckpt, out, BuildConfig(max_batch_size=16, max_seq_len=256, max_num_tokens=64, tp_size=size))


def greedy(engine: LLMEngine, prompts):
    reqs = [engine.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=12,
                                                                         ignore_eos=True)) for p in prompts]
    while engine.has_unfinished_requests():
        engine.step()
    return [r.final_output().outputs[0].token_ids for r in reqs]


def logits(engine: LLMEngine, ids):
    seq = Sequence("x", ids, SamplingParams())
    assert engine.kv.allocate_slots(seq, len(ids))
    out = engine.runner.forward([ScheduledSeq(seq, len(ids), True)], logit_rows=list(range(len(ids))))
    engine.kv.free(seq)
    return out


@pytest.mark.parametrize("kind,size", [("llama-gqa", 2), ("llama-tied", 2), ("llama-tied", 4), ("qwen2-bias", 2)])
def test_tp_matches_single_rank(tiny_factory, tmp_path_factory, kind, size):
    eng1, engn = tp_engine(tiny_factory, tmp_path_factory, kind, size)
    rng = random.Random(size)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(1, 70))] for _ in range(6)]
    one = LLMEngine(eng1, show_progress=False)
    tp = LLMEngine(engn, show_progress=False)
    try:
        torch.testing.assert_close(logits(tp, prompts[0]), logits(one, prompts[0]), atol=1e-4, rtol=1e-4)
        assert greedy(tp, prompts) == greedy(one, prompts)
        assert tp.kv.num_used_blocks == 0
    finally:
        tp.shutdown()


def test_shards_concatenate_to_the_original():
    cfg = ModelConfig(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=6, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(cfg.q_size + 2 * cfg.kv_size, 8, generator=g)
    down = torch.randn(8, 6, generator=g)
    emb = torch.randn(10, 8, generator=g)
    lays = [tp_layout(cfg, r, 2) for r in range(2)]
    parts = [shard_tensor("layers.0.mlp.down_proj.weight", down, cfg, lay) for lay in lays]
    assert torch.equal(torch.cat(parts, dim=1), down)
    parts = [shard_tensor("embed_tokens.weight", emb, cfg, lay) for lay in lays]
    assert torch.equal(torch.cat(parts)[:10], emb)
    q, k, v = qkv.split([8, 4, 4])
    parts = [shard_tensor("layers.0.self_attn.qkv_proj.weight", qkv, cfg, lay) for lay in lays]
    assert torch.equal(torch.cat([p[:4] for p in parts]), q)
    assert torch.equal(torch.cat([p[4:6] for p in parts]), k)
    assert torch.equal(torch.cat([p[6:8] for p in parts]), v)


def test_unshardable_sizes_refused():
    cfg = ModelConfig(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=6, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        tp_layout(cfg, 0, 3)
