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
