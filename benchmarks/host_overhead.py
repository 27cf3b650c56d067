"""Host time per decode step at large batch, with the model's forward taken out: what scheduling, input
preparation, sampling bookkeeping and output collection cost the host per step and per sequence.

    python benchmarks/host_overhead.py ENGINE [--batch 256,512,1024] [--steps 60] [--device cpu|cuda]

Pipelined steps hide this time behind the GPU only while it is shorter than the GPU's step, so at large
batches it bounds throughput (an 8B GQA decode step at batch 1,024 reads ~21 GB: ~7 ms on an H100). The
forward is replaced by one that still builds the attention metadata (that is host work) and returns zero
logits of the right shape, so everything else, sampling included, runs as in a real step; on a CPU the
sampler's tensor ops are counted too (on a GPU they are device work), which greedy sampling, the default
here, keeps small. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmc.benchmark.workload import random_requests  # noqa: E402
from llmc.plugins.metadata import AttentionMetadata  # noqa: E402
from llmc.runtime.engine import LLMEngine  # noqa: E402
from llmc.runtime.sampling_params import SamplingParams  # noqa: E402


def host_step_ms(engine_dir: str, batch: int, steps: int, prompt_len: int, device: str,
                 temperature: float) -> dict:
    max_tokens = 2 * steps + 64  # nobody finishes inside the timed window
    blocks = batch * ((prompt_len + max_tokens) // 16 + 2)
    eng = LLMEngine(engine_dir, device=device, num_kv_blocks=blocks, max_batch_size=batch, show_progress=False,
                    cuda_graph_batch_sizes=[])
    runner, vocab = eng.runner, eng.vocab_size
    zeros: dict[int, torch.Tensor] = {}  # one logits buffer per row count, as a graph's static output

    def forward_without_model(lists, logit_rows=None, feed=None):
        ids, pos, q_lens, s_lens, tables, sample_rows = lists
        rows = sample_rows if logit_rows is None else logit_rows
        AttentionMetadata.build_with(q_lens, s_lens, tables, runner.block_size, runner.device, ids, pos, rows)
        if len(rows) not in zeros:
            zeros[len(rows)] = torch.zeros(len(rows), vocab, device=runner.device)
        return zeros[len(rows)]

    runner.forward_lists = forward_without_model
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=temperature)
    for r in random_requests(batch, prompt_len, 1, vocab, seed=0):
        eng.add_request(prompt_token_ids=r.prompt_token_ids, params=params)
    while eng.scheduler.waiting or any(s.in_prefill for s in eng.scheduler.running):
        eng.step()
    for _ in range(3):
        eng.step()
    seqs = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        seqs += eng.scheduler.num_running
        eng.step()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    running = seqs / steps
    eng.shutdown()
    return {"batch": batch, "running": running, "host_ms_per_step": round(ms, 3),
            "host_us_per_seq": round(ms * 1e3 / max(running, 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--batch", default="256,512,1024", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=60, help="timed decode steps per batch size")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 (greedy) keeps the sampler's tensor work, device work on a GPU, small on a CPU")
    a = ap.parse_args()
    rows = [host_step_ms(a.engine, int(b), a.steps, a.prompt_len, a.device, a.temperature)
            for b in a.batch.split(",")]
    print(json.dumps({"what": "host time per decode step, model forward removed", "engine": a.engine,
                      "device": a.device, "python": platform.python_version(),
                      "cpu": platform.processor() or platform.machine(), "prompt_len": a.prompt_len,
                      "temperature": a.temperature, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
