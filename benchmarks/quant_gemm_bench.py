"""Quantized GEMM kernels and the decode-rows GEMV on a CUDA GPU against bf16 ``F.linear`` (cuBLAS).

    python3 benchmarks/quant_gemm_bench.py [--sweep | --sweep-only] [--rows 1,2,4,8,16,64,256]

Shapes are Llama-2-7B's four projections (fused QKV, O, fused gate/up, down). For each method and row
count: microseconds per call replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``: no
Python launch overhead, as in an engine's decode step), each call on another copy of the weights (>= 256 MB
in all, 5x the L2) so weights stream from HBM as in a decode step, and the weight bytes read per second,
beside a device copy measured in the same run. Up to 4 rows (its most) also time ``gemv.py`` (``bf16_gemv``; int8/fp8/
w8a8 as ``<method>_gemv`` against ``<method>_mma``, the decode tiling it replaces).
``--sweep`` times grids at one row: the GEMV's tiles (``gemv.TACTICS``) for bf16 weights, the fp8 MMA decode
tiling (small_*: tiles, stages, split-K target), the int4 GEMV (``quant_gemm.TACTICS`` gemv_*) and the GEMV's
tiles for fp8 weights (``q8_*``); it reports the best in sum over the four shapes (what the build-time tuner
would store) and per shape. Prints the GEMM table as one JSON object, then each ``--sweep-set`` grid as another.
Random weights. fp8 / W8A8 rows are quantized before timing, as the engine hands them over (until the eighth
session the per-call quantization was timed too).
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
from llmc.plugins import gemv  # noqa: E402
from llmc.plugins.act_quant import QUANTIZED_INPUT_METHODS, quantize_rows  # noqa: E402
from llmc.plugins import quant_gemm as qg  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
METHODS = ["int8", "int4", "fp8", "w8a8"]
GROUP = 128
GEMV_ROWS = gemv.MAX_ROWS  # row counts up to this also time the GEMV (gemv.py) against the MMA kernels


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
    """One linear as the engine runs it: fp8 / W8A8 rows arrive quantized (the norm or SwiGLU before them
    writes them, ``ops.FUSIONS["act_quant"]``), so their quantization is not timed here."""
    if method in QUANTIZED_INPUT_METHODS:
        x = quantize_rows(x, method, None)
    return lambda: qg.qgemm(x, method, t["qweight"], t["scales"], t.get("zeros"), GROUP, None, None,
                            t.get("scales_gn"), t.get("zeros_gn"))


def quant_copies(method: str, n: int, k: int) -> list[dict]:
    one = make(method, n, k)
    extra = [{name: v.clone() if torch.is_tensor(v) else v for name, v in one.items()}
             for _ in range(max(1, -(-L2_SPAN // one["bytes"])) - 1)]
    return [one] + extra


def _variants(method: str, rows: int) -> list[tuple[str, dict, dict]]:
    """(label, gemv tactics, quant_gemm tactics) timed for ``method`` at ``rows``: 8-bit weights as the GEMV
    and as the MMA decode tiling up to the GEMV's rows; int4 up to its GEMV's rows as that GEMV (its default
    tactics), its byte-wise variant and the MMA decode tiling."""
    if rows > GEMV_ROWS:
        return [(method, {}, {})]
    if method == "int4":
        return [("int4_gemv", {}, {"gemv_max_m": GEMV_ROWS}),
                ("int4_gemv_bytes", {}, {"gemv_max_m": GEMV_ROWS, "gemv_words": 0}),
                ("int4_mma", {}, {"gemv_max_m": 0})]
    return [(method + "_gemv", {"q8_max_m": GEMV_ROWS, "w8a8_gemv": 1}, {}),
            (method + "_mma", {"q8_max_m": 0, "w8a8_gemv": 0}, {})]


def bench_all(rows: list[int]) -> dict:
    out: dict = {}
    for name, (n, k) in SHAPES.items():
        wbs = copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
        qs = {m: quant_copies(m, n, k) for m in METHODS}
        for m_rows in rows:
            x = torch.randn(m_rows, k, device="cuda", dtype=torch.bfloat16)
            row = {"bf16": {"us": timed([lambda w=w: F.linear(x, w) for w in wbs]), "bytes": n * k * 2}}
            if m_rows <= GEMV_ROWS:
                row["bf16_gemv"] = {"us": timed([lambda w=w: gemv.gemv(x, w) for w in wbs]), "bytes": n * k * 2}
            for m in METHODS:
                for label, gemv_t, qg_t in _variants(m, m_rows):
                    saved, saved_qg = dict(gemv.TACTICS), dict(qg.TACTICS)
                    gemv.TACTICS.update(gemv_t)
                    qg.TACTICS.update(qg_t)
                    try:
                        fns = [call(m, t, x) for t in qs[m]]
                        fns[0]()
                        row[label] = {"us": timed(fns), "bytes": qs[m][0]["bytes"]}
                    except Exception as e:  # noqa: BLE001 - reported, the run goes on
                        row[label] = {"error": repr(e)[:300]}
                    finally:
                        gemv.TACTICS.update(saved)
                        qg.TACTICS.update(saved_qg)
            for m, r in row.items():
                if "us" in r:
                    r["GBps"] = r["bytes"] / r["us"] / 1e3
                    r["speedup_vs_bf16"] = row["bf16"]["us"] / r["us"]
            out[f"{name}_N{n}_K{k}_M{m_rows}"] = row
        del wbs, qs
        torch.cuda.empty_cache()
    return out


def _grid(method: str, rows: int, keys: tuple[str, ...], grid, module=qg, fixed: dict | None = None,
          fixed_qg: dict | None = None) -> dict:
    """Best of ``grid`` (tuples of values for ``keys`` in ``module.TACTICS``) by summed time over the four
    shapes; ``method`` 'bf16' times the float linear's dispatch (``ops.linear``'s CUDA path). ``fixed`` /
    ``fixed_qg``: gemv / quant_gemm tactics held during the sweep (e.g. ``q8_max_m=0`` to time the MMA decode
    tiling at one row)."""
    from llmc.plugins import triton_kernels as tk

    saved_gemv, saved_qg = dict(gemv.TACTICS), dict(qg.TACTICS)
    gemv.TACTICS.update(fixed or {})
    qg.TACTICS.update(fixed_qg or {})
    saved = dict(module.TACTICS)  # what each variant starts from: the fixed tactics in place
    if method == "bf16":
        ws = {name: copies(lambda n=n, k=k: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, n * k * 2)
              for name, (n, k) in SHAPES.items()}
        fn = lambda w, x: lambda: tk.linear(x, w)  # noqa: E731
    else:
        ws = {name: quant_copies(method, n, k) for name, (n, k) in SHAPES.items()}
        fn = lambda t, x: call(method, t, x)  # noqa: E731
    xs = {name: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
    default = [saved[k] for k in keys]
    rows_out = []
    for cfg in grid:
        module.TACTICS.update(dict(zip(keys, cfg)))
        try:
            per = {s: timed([fn(t, xs[s]) for t in ws[s]]) for s in SHAPES}
            rows_out.append({"cfg": list(cfg), "us_total": sum(per.values()), "us": per})
        except Exception as e:  # noqa: BLE001 - an invalid variant is skipped
            rows_out.append({"cfg": list(cfg), "error": repr(e)[:120]})
        module.TACTICS.clear()
        module.TACTICS.update(saved)
    gemv.TACTICS.clear()
    gemv.TACTICS.update(saved_gemv)
    qg.TACTICS.clear()
    qg.TACTICS.update(saved_qg)
    del ws
    torch.cuda.empty_cache()
    ok = sorted((r for r in rows_out if "us_total" in r), key=lambda r: r["us_total"])
    per_shape = {s: min(ok, key=lambda r: r["us"][s]) for s in SHAPES} if ok else {}
    return {"keys": keys, "best": ok[0] if ok else None, "top5": ok[:5], "n_variants": len(rows_out),
            "best_per_shape": {s: {"cfg": r["cfg"], "us": r["us"][s]} for s, r in per_shape.items()},
            "default_us_total": next((r["us_total"] for r in ok if r["cfg"] == default), None),
            "first": rows_out[0] if rows_out else None}  # a grid's first entry: the baseline it is compared with


def sweep(names: list[str] | None = None) -> dict:
    """The one-row grids named in ``names`` (all when None)."""
    gemv_keys = ("gemv_block_n", "gemv_block_k", "gemv_num_warps", "gemv_words")
    gemv_grid = list(itertools.product((32, 64, 128), (256, 512), (4, 8), (1, 2))) + [(16, 1024, 4, 0)]  # + bytes
    small = ("small_block_n", "small_block_k", "small_num_stages", "small_target_programs")
    small_grid = list(itertools.product((32, 64, 128), (128, 256, 512), (4, 6), (264, 528)))
    tiles = ("block_n", "block_k", "num_warps", "x_vector")
    tile_grid = [c for c in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (0, 1)) if c[0] > 4 or not c[3]]
    # the pipelined K loop (tiles copied ahead into shared memory): activations as one vector, so each stage
    # holds them once; the unpipelined default first, for the comparison
    staged = tiles + ("stages",)
    piped = list(itertools.product((2, 4, 8), (256, 512, 1024), (4, 8), (1,), (2, 3, 4)))
    staged_grid = [(4, 512, 4, 0, 1)] + piped
    q8_staged, q8_staged_grid = tuple("q8_" + t for t in staged), [(4, 256, 8, 0, 1)] + piped  # 8-bit baseline
    # f16 products take fewer registers per weight: larger tiles too; the default tile first
    half_grid = [(8, 1024, 4, 1, 4)] + list(itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8), (1,), (3, 4)))
    grids = {"bf16_m1_gemv": lambda: _grid("bf16", 1, tiles, tile_grid, module=gemv, fixed={"stages": 1}),
             "fp8_m1_mma": lambda: _grid("fp8", 1, small, small_grid, fixed={"q8_max_m": 0}),
             "int4_m1_gemv": lambda: _grid("int4", 1, gemv_keys, gemv_grid),
             "int4_m1_stages": lambda: _grid("int4", 1, gemv_keys[:3] + ("gemv_num_stages",),
                                             [(64, 512, 4, 1), (64, 512, 4, 2), (64, 512, 4, 4)]
                                             + list(itertools.product((32, 64, 128), (256, 512), (4, 8), (3,)))),
             "int4_m1_mma": lambda: _grid("int4", 1, small[:3], sorted({c[:3] for c in small_grid}),
                                          fixed_qg={"gemv_max_m": 0}),
             "fp8_m1_gemv": lambda: _grid("fp8", 1, tuple("q8_" + t for t in tiles), tile_grid, module=gemv,
                                          fixed={"q8_max_m": 1, "q8_stages": 1, "q8_half": 0}),
             "int8_m1_gemv": lambda: _grid("int8", 1, tuple("q8_" + t for t in tiles), tile_grid, module=gemv,
                                           fixed={"q8_max_m": 1, "q8_stages": 1}),
             "bf16_m1_stages": lambda: _grid("bf16", 1, staged, staged_grid, module=gemv),
             "fp8_m1_stages": lambda: _grid("fp8", 1, q8_staged, q8_staged_grid, module=gemv,
                                            fixed={"q8_max_m": 1, "q8_half": 0}),
             "fp8_m1_half": lambda: _grid("fp8", 1, tuple("h8_" + t for t in staged), half_grid, module=gemv,
                                          fixed={"q8_max_m": 1, "q8_half": 1}),  # f16 products (gemv HALF)
             "int8_m1_stages": lambda: _grid("int8", 1, q8_staged, q8_staged_grid, module=gemv,
                                             fixed={"q8_max_m": 1})}
    unknown = set(names or ()) - set(grids)
    if unknown:
        raise SystemExit(f"--sweep-set: unknown {sorted(unknown)}; choose from {sorted(grids)}")
    return {name: run() for name, run in grids.items() if names is None or name in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="1,2,4,8,16,64,256")
    ap.add_argument("--sweep-only", action="store_true", help="skip the GEMM table")
    ap.add_argument("--sweep-set", default="", help="comma-separated sweep grids (default: all of them)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU: this benchmark needs one"}))
        return
    import triton

    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "weights": "random", "group_size": GROUP, "tactics": dict(qg.TACTICS), "gemv_tactics": dict(gemv.TACTICS),
           "copy_GBps": copy_gbps()}
    if not a.sweep_only:
        res["gemm"] = bench_all([int(r) for r in a.rows.split(",")])
    print(json.dumps(res, indent=1), flush=True)  # one JSON object per section: a cut-off run keeps the first
    if a.sweep or a.sweep_only:  # one JSON object per grid, as each finishes: a cut-off run keeps the first
        for name in [n for n in a.sweep_set.split(",") if n] or [None]:
            print(json.dumps({"sweep": sweep(None if name is None else [name])}, indent=1), flush=True)


if __name__ == "__main__":
    main()
