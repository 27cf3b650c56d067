"""Quantized GEMM kernels on a CUDA GPU against bf16 ``F.linear`` (cuBLAS); prints one JSON object.

    python3 benchmarks/quant_gemm_bench.py [--sweep] [--rows 1,16,64,256]

Shapes are Llama-2-7B's four projections (fused QKV, O, fused gate/up, down). For each method and row
count: microseconds per call replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``: no
Python launch overhead, as in an engine's decode step), each call on another copy of the weights (>= 256 MB
in all, 5x the L2) so weights stream from HBM as in a decode step and the weight bytes read per second, beside a device copy measured in the
same run. ``--sweep`` times a grid of the int4 GEMV tiling (``quant_gemm.TACTICS`` gemv_*) and of the fp8 decode
tiling (small_*, fused activation quantization or not) at one row, and reports the best (what the build-time tuner would store).
Prints the GEMM table as one JSON object, then the sweep as a second one. Random weights.
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


L2_SPAN = 256 << 20


def copies(make_one, nbytes: int) -> list:
    """Enough independent copies of a weight that cycling through them never hits in L2."""
    return [make_one() for _ in range(max(1, -(-L2_SPAN // nbytes)))]


def timed(fns: list) -> float:
    """Microseconds per call, graph-replayed, cycling through ``fns`` (one per weight copy)."""
    import triton.testing as tt

    def run():
        for f in fns:
            f()
    return tt.do_bench_cudagraph(run, rep=30) * 1e3 / len(fns)


def call(method: str, t: dict, x: torch.Tensor):
    return lambda: qg.qgemm(x, method, t["qweight"], t["scales"], t.get("zeros"), GROUP, None, None,
                            t.get("scales_gn"), t.get("zeros_gn"))


def quant_copies(method: str, n: int, k: int) -> list[dict]:
    one = make(method, n, k)
    extra = [{name: v.clone() if torch.is_tensor(v) else v for name, v in one.items()}
             for _ in range(max(1, -(-L2_SPAN // one["bytes"])) - 1)]
    return [one] + extra


def bench_all(rows: list[int]) -> dict:
    out: dict = {}
    for name, (n, k) in SHAPES.items():
        wbs = copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
        qs = {m: quant_copies(m, n, k) for m in METHODS}
        for m_rows in rows:
            x = torch.randn(m_rows, k, device="cuda", dtype=torch.bfloat16)
            row = {"bf16": {"us": timed([lambda w=w: F.linear(x, w) for w in wbs]), "bytes": n * k * 2}}
            for m in METHODS:
                try:
                    fns = [call(m, t, x) for t in qs[m]]
                    fns[0]()
                    row[m] = {"us": timed(fns), "bytes": qs[m][0]["bytes"]}
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    row[m] = {"error": repr(e)[:300]}
            for m, r in row.items():
                if "us" in r:
                    r["GBps"] = r["bytes"] / r["us"] / 1e3
                    r["speedup_vs_bf16"] = row["bf16"]["us"] / r["us"]
            out[f"{name}_N{n}_K{k}_M{m_rows}"] = row
        del wbs, qs
        torch.cuda.empty_cache()
    return out


def _grid(method: str, rows: int, keys: tuple[str, ...], grid) -> dict:
    """Best of ``grid`` (tuples of values for ``keys``) by summed time over the four shapes."""
    saved = dict(qg.TACTICS)
    ws = {name: quant_copies(method, n, k) for name, (n, k) in SHAPES.items()}
    xs = {name: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
    default = [saved[k] for k in keys]
    rows_out = []
    for cfg in grid:
        qg.TACTICS.update(dict(zip(keys, cfg)))
        try:
            total = sum(timed([call(method, t, xs[s]) for t in ws[s]]) for s in SHAPES)
            rows_out.append({"cfg": list(cfg), "us_total": total})
        except Exception as e:  # noqa: BLE001 - an invalid variant is skipped
            rows_out.append({"cfg": list(cfg), "error": repr(e)[:120]})
        qg.TACTICS.clear()
        qg.TACTICS.update(saved)
    ok = sorted((r for r in rows_out if "us_total" in r), key=lambda r: r["us_total"])
    return {"keys": keys, "best": ok[0] if ok else None, "top5": ok[:5], "n_variants": len(rows_out),
            "default_us_total": next((r["us_total"] for r in ok if r["cfg"] == default), None)}


def sweep() -> dict:
    gemv = ("gemv_block_n", "gemv_block_k", "gemv_num_warps", "gemv_words")
    gemv_grid = list(itertools.product((16, 32, 64), (256, 512, 1024), (4, 8), (0, 1)))
    small = ("small_block_n", "small_block_k", "fuse_act_quant", "small_swap")
    small_grid = list(itertools.product((32, 64), (128, 256), (0, 1), (0, 1)))
    return {"int4_m1_gemv": _grid("int4", 1, gemv, gemv_grid), "fp8_m1": _grid("fp8", 1, small, small_grid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="1,16,64,256")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU: this benchmark needs one"}))
        return
    import triton

    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "weights": "random", "group_size": GROUP, "tactics": dict(qg.TACTICS), "copy_GBps": copy_gbps()}
    res["gemm"] = bench_all([int(r) for r in a.rows.split(",")])
    print(json.dumps(res, indent=1), flush=True)  # one JSON object per section: a cut-off run keeps the first
    if a.sweep:
        print(json.dumps({"sweep": sweep()}, indent=1))


if __name__ == "__main__":
    main()
