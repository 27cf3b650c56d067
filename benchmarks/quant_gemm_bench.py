"""Quantized GEMM kernels on a CUDA GPU against bf16 ``F.linear`` (cuBLAS); prints one JSON object.

    python3 benchmarks/quant_gemm_bench.py [--sweep] [--rows 1,16,256]

Shapes are Llama-2-7B's four projections (fused QKV, O, fused gate/up, down). For each method and row
count: microseconds per call (``triton.testing.do_bench``, L2 flushed between calls, so weights stream
from HBM as in a decode step) and the weight bytes read per second, beside a device copy measured in the
same run. ``--sweep`` times a grid of the decode tiling (``quant_gemm.TACTICS`` small_*) for int4 and
int8 at one row and reports the best (what the build-time tuner would store). Random weights.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmc.convert.quantize import quantize_projection  # noqa: E402
from llmc.plugins import quant_gemm as qg  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
METHODS = ["int8", "int4", "fp8", "w8a8"]
GROUP = 128


def copy_gbps() -> float:
    import triton.testing as tt

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), warmup=5, rep=50)
    return 2 * a.numel() / ms / 1e6


def make(method: str, n: int, k: int) -> dict:
    w = torch.randn(n, k, device="cuda") * 0.02
    t = {name: v.cuda() for name, v in quantize_projection(method, w, GROUP).items()}
    if method in ("int4", "int4-awq"):
        t["scales_gn"], t["zeros_gn"] = t["scales"].t().contiguous(), t["zeros"].t().contiguous()
    t["bytes"] = sum(v.numel() * v.element_size() for name, v in t.items() if not name.endswith("_gn"))
    return t


def call(method: str, t: dict, x: torch.Tensor):
    return lambda: qg.qgemm(x, method, t["qweight"], t["scales"], t.get("zeros"), GROUP, None, None,
                            t.get("scales_gn"), t.get("zeros_gn"))


def bench_all(rows: list[int]) -> dict:
    import triton.testing as tt

    out: dict = {}
    for name, (n, k) in SHAPES.items():
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        qs = {m: make(m, n, k) for m in METHODS}
        for m_rows in rows:
            x = torch.randn(m_rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), wb.float())
            row = {"bf16": {"us": tt.do_bench(lambda: F.linear(x, wb), warmup=10, rep=100) * 1e3,
                            "bytes": wb.numel() * 2}}
            for m in METHODS:
                try:
                    f = call(m, qs[m], x)
                    f()
                    row[m] = {"us": tt.do_bench(f, warmup=10, rep=100) * 1e3, "bytes": qs[m]["bytes"]}
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    row[m] = {"error": repr(e)[:300]}
            for m, r in row.items():
                if "us" in r:
                    r["GBps"] = r["bytes"] / r["us"] / 1e3
                    r["speedup_vs_bf16"] = row["bf16"]["us"] / r["us"]
            del ref
            out[f"{name}_N{n}_K{k}_M{m_rows}"] = row
    return out


def sweep() -> dict:
    import triton.testing as tt

    res: dict = {}
    saved = dict(qg.TACTICS)
    for method in ("int4", "int8"):
        ws = {name: make(method, n, k) for name, (n, k) in SHAPES.items()}
        xs = {name: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
        best = None
        rows = []
        for bn, bk, stages, warps, target in itertools.product((16, 32, 64), (64, 128, 256), (3, 4), (4,),
                                                                 (132, 264, 528)):
            qg.TACTICS.update(small_block_n=bn, small_block_k=bk, small_num_stages=stages, small_num_warps=warps,
                              small_target_programs=target)
            try:
                total = sum(tt.do_bench(call(method, ws[s], xs[s]), warmup=5, rep=30) * 1e3 for s in SHAPES)
            except Exception as e:  # noqa: BLE001 - an invalid variant is skipped
                rows.append({"cfg": [bn, bk, stages, warps, target], "error": repr(e)[:120]})
                continue
            rows.append({"cfg": [bn, bk, stages, warps, target], "us_total": total})
            if best is None or total < best["us_total"]:
                best = rows[-1]
        qg.TACTICS.clear()
        qg.TACTICS.update(saved)
        res[method] = {"best": best, "default_us_total": next(
            (r["us_total"] for r in rows if r["cfg"] == [saved["small_block_n"], saved["small_block_k"],
                                                         saved["small_num_stages"], saved["small_num_warps"],
                                                         saved["small_target_programs"]] and "us_total" in r),
            None), "n_variants": len(rows), "top5": sorted((r for r in rows if "us_total" in r),
                                                           key=lambda r: r["us_total"])[:5]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="1,16,256")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU: this benchmark needs one"}))
        return
    import triton

    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "weights": "random", "group_size": GROUP, "tactics": dict(qg.TACTICS), "copy_GBps": copy_gbps()}
    res["gemm"] = bench_all([int(r) for r in a.rows.split(",")])
    if a.sweep:
        res["sweep"] = sweep()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
