"""One Llama-2-7B projection's decode-row GEMM, launched a few times, for Nsight Compute to read its counters.

    ncu --clock-control none --kernel-name regex:gemv --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/gemv_profile.py --method fp8 \
        --shape gate_up [--tactic gemv.q8_block_k=512]

Why: instruction counts (sass_profile.py) did not predict the fp8 GEMV (BENCHMARKS.md, 2026-12-02 third
session), so what bounds a kernel is read from the hardware (stall reasons, DRAM throughput, occupancy).
``--method`` bf16 runs the float linear's dispatch (``triton_kernels.linear``), the others ``qgemm``. Each
launch reads another copy of the weight, so it streams from HBM as in a decode step. Random weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_latency import override_tactics  # noqa: E402
from benchmarks.quant_gemm_bench import SHAPES, call, make  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="fp8", choices=["bf16", "int8", "int4", "fp8", "w8a8"])
    ap.add_argument("--shape", default="gate_up", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--launches", type=int, default=4)
    ap.add_argument("--tactic", action="append", default=[], metavar="MODULE.KEY=INT")
    a = ap.parse_args()
    override_tactics(a.tactic)
    n, k = SHAPES[a.shape]
    x = torch.randn(a.rows, k, device="cuda", dtype=torch.bfloat16)
    if a.method == "bf16":
        from llmc.plugins import triton_kernels as tk

        fns = [lambda w=torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02: tk.linear(x, w)
               for _ in range(a.launches)]
    else:
        fns = [call(a.method, make(a.method, n, k), x) for _ in range(a.launches)]
    for f in fns:
        f()
    torch.cuda.synchronize()
    print(f"{a.method} {a.shape} {n}x{k} rows={a.rows}: {a.launches} launches")


if __name__ == "__main__":
    main()
