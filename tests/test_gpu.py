"""GPU execution (marked `gpu`, skipped without CUDA): the whole model on the GPU against the CPU
reference, greedy tokens GPU == CPU, and CUDA-graph decode == eager decode."""
from __future__ import annotations

import random

import pytest
import torch

from llmc.runtime.engine import LLMEngine
from llmc.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randint(1, 120))] for _ in range(n)]


def _run(eng, prompts, max_tokens=16):
    reqs = [eng.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                      ignore_eos=True)) for p in prompts]
    while eng.has_unfinished_requests():
        eng.step()
    return [r.final_output().outputs[0].token_ids for r in reqs]


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias", "llama3-rope"])
def test_gpu_logits_match_cpu(tiny_factory, kind):
    from tests.test_foundation import runner_logits_on

    _, engine = tiny_factory(kind)
    ids = _prompts(1, 3)[0] + _prompts(1, 4)[0]
    cpu = runner_logits_on(engine, ids, "cpu", "float32", chunk=13)
    gpu32 = runner_logits_on(engine, ids, "cuda", "float32", chunk=13).cpu()
    torch.testing.assert_close(gpu32, cpu, atol=2e-3, rtol=2e-3)
    gpu16 = runner_logits_on(engine, ids, "cuda", "bfloat16", chunk=13).cpu()
    assert (gpu16 - cpu).abs().max() < 0.1 * cpu.abs().max()


def test_gpu_greedy_matches_cpu_and_graphs_match_eager(tiny_factory):
    _, engine = tiny_factory("llama-gqa")
    prompts = _prompts(12, 5)
    cpu = _run(LLMEngine(engine, device="cpu", show_progress=False), prompts)
    eager = LLMEngine(engine, device="cuda", dtype="float32", show_progress=False, cuda_graph_batch_sizes=[])
    assert eager.runner.graphs is None
    graphs = LLMEngine(engine, device="cuda", dtype="float32", show_progress=False)
    assert graphs.runner.graphs is not None
    assert _run(eager, prompts) == cpu
    assert _run(graphs, prompts) == cpu
    assert graphs.kv.num_used_blocks == 0


def _greedy_logprobs(eng, prompts, max_tokens=24):
    reqs = [eng.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                      ignore_eos=True, logprobs=0)) for p in prompts]
    while eng.has_unfinished_requests():
        eng.step()
    outs = [r.final_output().outputs[0] for r in reqs]
    return [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs]


@pytest.fixture
def pdl_switch():
    from llmc.plugins import triton_compat

    saved = triton_compat.PDL["enabled"]
    yield triton_compat.PDL
    triton_compat.PDL["enabled"] = saved


@pytest.mark.parametrize("graphs", [False, True])
def test_pdl_gives_the_same_bits(tiny_factory, pdl_switch, graphs):
    """Programmatic dependent launch only moves when kernels start: greedy tokens and their logprobs in bf16
    are the same bits with it on and off, eager and in CUDA graphs (a missing wait would race)."""
    _, engine = tiny_factory("llama-gqa")
    prompts = _prompts(10, 11)
    kw = {} if graphs else {"cuda_graph_batch_sizes": []}
    runs = {}
    for on in (False, True):
        pdl_switch["enabled"] = on
        runs[on] = _greedy_logprobs(LLMEngine(engine, device="cuda", dtype="bfloat16", show_progress=False, **kw),
                                    prompts)
    assert runs[True] == runs[False]


def test_pdl_chain_at_7b_widths(pdl_switch):
    """A decode layer's small-op/GEMV chain at Llama-2-7B widths, replayed from a CUDA graph with PDL, equals
    the serial launches bit for bit: the wide grids give a racing read the time to see stale data."""
    from llmc.plugins import triton_kernels as tk

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    h, inter = 4096, 11008
    w_up = torch.randn(2 * inter, h, device=dev, dtype=dt) * 0.02
    w_down = torch.randn(h, inter, device=dev, dtype=dt) * 0.02
    g = torch.rand(h, device=dev, dtype=dt) + 0.5
    x0 = torch.randn(1, h, device=dev, dtype=dt)

    def chain(x):
        res = torch.zeros_like(x)
        for _ in range(6):
            y, res = tk.fused_add_rms_norm(x, res, g, 1e-5)
            x = tk.linear(tk.silu_and_mul(tk.linear(y, w_up)), w_down)
        return x, res

    pdl_switch["enabled"] = False
    want = chain(x0)
    pdl_switch["enabled"] = True
    chain(x0)  # compile the PDL variants outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(x0)
    for _ in range(20):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.fixture
def fusions():
    from llmc.plugins import ops

    saved = dict(ops.FUSIONS)
    yield ops.FUSIONS
    ops.FUSIONS.clear()
    ops.FUSIONS.update(saved)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_swiglu_in_the_gemv_gives_the_same_bits(tiny_factory, tmp_path, fusions, quant):
    """The SwiGLU computed in the gate/up GEMV's epilogue (decode rows, 16-bit and int8 weight-only) against the
    separate kernel: greedy tokens and logprobs in bf16 are the same bits, in CUDA graphs."""
    from llmc.build.builder import build
    from llmc.config import BuildConfig
    from llmc.convert import convert

    hf, engine = tiny_factory("llama-gqa")
    if quant:
        ck = convert(str(hf), tmp_path / "ckpt", dtype="float32", quant=quant)
        engine = build(ck, tmp_path / "engine", BuildConfig(max_batch_size=16, max_seq_len=256, max_num_tokens=64))
    prompts = _prompts(3, 17)
    runs = {}
    for on in (False, True):
        fusions["swiglu_gemv"] = on
        eng = LLMEngine(engine, device="cuda", dtype="bfloat16", show_progress=False)
        assert eng.runner.model.layers[0].mlp.swiglu_fused(torch.zeros(1, 8, device="cuda")) is on
        runs[on] = [_greedy_logprobs(eng, [p]) for p in prompts]  # one at a time: decode rows take the GEMV
    assert runs[True] == runs[False]
