"""Attention kernel benchmarks on a CUDA GPU; prints one JSON object.

    python3 benchmarks/kernels.py [--sweep] [--quick] [--kv-dtype fp8] [--decode-shapes 64x256,256x256] [--decode-only]

- decode: paged decode attention, batch 64 x 4096-token contexts, Llama-2-7B shape (32 query heads,
  32 KV heads, head dim 128, bf16, KV page 16). Reported as achieved GB/s = K/V bytes read / time, next to a
  device-to-device copy measured in the same run (the bandwidth a memory-bound kernel can hope for).
- prefill: varlen paged causal prefill (8 x 2048 and friends) against torch's flash
  ``scaled_dot_product_attention`` on the same shapes in contiguous layout, same data (outputs compared).

``--sweep`` also times a small grid of ``llmc.plugins.triton_kernels.TACTICS`` variants and reports the best of each (what a build-time tuner would store).
``--kv-dtype fp8|int8`` stores the decode and prefill K/V quantized (per-(token, head) scales, as
``--kv-cache-dtype``), V in the engine's head_dim-major pages (``--v-rowmajor``: row-major, to compare); GB/s
then counts the 1-byte values plus the scales. ``--decode-shapes BxCTX,...`` adds decode cases (and sweeps each
of them); ``--decode-only`` skips prefill.
Each case is guarded: a failure is reported in the JSON instead of ending the run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HQ, HKV, D, PAGE = 32, 32, 128, 16
DTYPE = torch.bfloat16


def bench_ms(fn, warmup=25, rep=200) -> float:
    """Median ms of ``fn`` (triton's do_bench flushes L2 between runs; CUDA events otherwise)."""
    try:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except Exception:  # pragma: no cover - fallback timing
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(30):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def paged_from_contiguous(ks: torch.Tensor, vs: torch.Tensor, q_lens: list[int]):
    """Scatter contiguous ``[B, H, L, D]`` K/V into a paged cache with shuffled blocks; returns caches and
    metadata whose contexts are exactly those K/V (so outputs can be compared with SDPA)."""
    from llmc.plugins.metadata import AttentionMetadata

    B, H, L, Dh = ks.shape
    nper = -(-L // PAGE)
    perm = torch.randperm(B * nper)
    tables = perm.view(B, nper).tolist()
    pad = nper * PAGE - L
    kc = torch.empty(B * nper, PAGE, H, Dh, device=ks.device, dtype=ks.dtype)
    vc = torch.empty_like(kc)
    for src, dst in ((ks, kc), (vs, vc)):
        x = F.pad(src.transpose(1, 2), (0, 0, 0, 0, 0, pad))  # [B, nper*PAGE, H, D]
        dst[perm.to(ks.device)] = x.reshape(B * nper, PAGE, H, Dh)
    meta = AttentionMetadata.build(q_lens, [L] * B, tables, PAGE, ks.device)
    return kc, vc, meta


_DATA: dict = {}


KV_DTYPE: torch.dtype | None = None  # --kv-dtype: quantized K/V cache
V_ROWMAJOR = False  # --v-rowmajor: 1-byte V pages row-major instead of the engine's head_dim-major layout


def _decode_data(batch: int, ctx: int):
    """Inputs (cached across calls, so a sweep times kernels, not data setup) and SDPA's answer."""
    key = ("decode", batch, ctx)
    if key not in _DATA:
        _DATA.clear()
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
        ks = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=DTYPE)
        vs = torch.randn_like(ks)
        kc, vc, meta = paged_from_contiguous(ks, vs, [1] * batch)
        kc, vc, scales, ks, vs = _quantized(kc, vc, ks, vs, meta)
        # same math through SDPA: one query row per sequence sees its whole context (GQA: repeat K/V)
        rep = HQ // HKV
        ref = F.scaled_dot_product_attention(q.view(batch, HQ, 1, D), ks.repeat_interleave(rep, 1),
                                             vs.repeat_interleave(rep, 1), scale=D ** -0.5).view(batch, HQ, D)
        _DATA[key] = (q, kc, vc, meta, ref, scales)
    return _DATA[key]


def _quantized(kc, vc, ks, vs, meta):
    """With ``--kv-dtype fp8|int8``: the paged pools quantized (V in the engine's page layout unless
    ``--v-rowmajor``), their scales, and the dequantized contiguous K/V that SDPA gets; else all unchanged."""
    if KV_DTYPE is None:
        return kc, vc, (), ks, vs
    from llmc.plugins.kv_layout import v_cache_layout
    from llmc.plugins.reference import dequantize_kv, quantize_kv

    batch, _, ctx, _ = ks.shape
    (kc, k_sc), (vc, v_sc) = quantize_kv(kc, KV_DTYPE), quantize_kv(vc, KV_DTYPE)
    ks = _contiguous_from_paged(dequantize_kv(kc, k_sc).to(DTYPE), meta, batch, ctx)
    vs = _contiguous_from_paged(dequantize_kv(vc, v_sc).to(DTYPE), meta, batch, ctx)
    return kc, (vc if V_ROWMAJOR else v_cache_layout(vc)), (k_sc, v_sc), ks, vs


def _contiguous_from_paged(cache: torch.Tensor, meta, batch: int, ctx: int) -> torch.Tensor:
    """``[B, H, L, D]`` of each sequence's context read back through its block table."""
    nper = -(-ctx // PAGE)
    rows = cache[meta.block_tables[:, :nper].reshape(-1).long()]  # [B*nper, PAGE, H, D]
    return rows.view(batch, nper * PAGE, HKV, D)[:, :ctx].transpose(1, 2).contiguous()


def decode_case(impl, batch=64, ctx=4096) -> dict:
    from llmc.plugins.kv_layout import kv_bytes_per_token_head

    q, kc, vc, meta, ref, scales = _decode_data(batch, ctx)
    scale = D ** -0.5
    out = impl.paged_attention(q, kc, vc, meta, scale, *scales)
    err = (out.float() - ref.float()).abs().max().item()
    ms = bench_ms(lambda: impl.paged_attention(q, kc, vc, meta, scale, *scales), warmup=50, rep=300)
    kv_bytes = batch * ctx * HKV * kv_bytes_per_token_head(D, kc.dtype, bool(scales))
    res = {"batch": batch, "ctx": ctx, "kv_dtype": str(kc.dtype), "ms": ms, "GBps": kv_bytes / ms / 1e6,
           "max_abs_err_vs_sdpa": err}
    if hasattr(impl, "decode_num_splits"):
        try:
            res["num_splits"] = impl.decode_num_splits(batch, HKV, ctx)
        except TypeError:
            pass
    return res


def _prefill_data(n_seq: int, L: int):
    key = ("prefill", n_seq, L)
    if key not in _DATA:
        _DATA.clear()
        torch.cuda.empty_cache()
        torch.manual_seed(1)
        qs = torch.randn(n_seq, HQ, L, D, device="cuda", dtype=DTYPE)
        ks = torch.randn(n_seq, HKV, L, D, device="cuda", dtype=DTYPE)
        vs = torch.randn_like(ks)
        kc, vc, meta = paged_from_contiguous(ks, vs, [L] * n_seq)
        kc, vc, scales, ks, vs = _quantized(kc, vc, ks, vs, meta)
        q = qs.transpose(1, 2).reshape(n_seq * L, HQ, D).contiguous()
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx_mgr, backend = sdpa_kernel(SDPBackend.FLASH_ATTENTION), "flash"
        except Exception:  # older torch
            import contextlib

            ctx_mgr, backend = contextlib.nullcontext(), "default"
        with ctx_mgr:
            ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=D ** -0.5)
            sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=D ** -0.5))
        ref = ref.transpose(1, 2).reshape(n_seq * L, HQ, D)
        _DATA[key] = (q, kc, vc, meta, ref, sdpa, backend, scales)
    return _DATA[key]


def prefill_case(impl, n_seq, L) -> dict:
    q, kc, vc, meta, ref, sdpa, backend, scales = _prefill_data(n_seq, L)
    scale = D ** -0.5
    out = impl.paged_attention(q, kc, vc, meta, scale, *scales)
    err = (out.float() - ref.float()).abs().max().item()
    ours = bench_ms(lambda: impl.paged_attention(q, kc, vc, meta, scale, *scales))
    flops = 4 * n_seq * HQ * L * L * D / 2  # causal: half of QK^T and PV
    return {"seqs": n_seq, "len": L, "kv_dtype": str(kc.dtype), "llmc_ms": ours, "sdpa_ms": sdpa,
            "sdpa_backend": backend, "ratio_llmc_over_sdpa": ours / sdpa, "llmc_TFLOPs": flops / ours / 1e9,
            "sdpa_TFLOPs": flops / sdpa / 1e9, "max_abs_err_vs_sdpa": err}


def copy_bandwidth() -> dict:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), warmup=5, rep=50)
    return {"bytes": x.numel(), "ms": ms, "GBps_read_plus_write": 2 * x.numel() / ms / 1e6}


def guarded(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception as e:  # keep going; the lead reads the JSON
        traceback.print_exc(file=sys.stderr)
        torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def sweep(impl, decode_shapes: list[tuple[int, int]], prefill: bool = True) -> dict:
    """Time a small grid of TACTICS for decode (each shape) and prefill; report each variant and the best."""
    base = dict(impl.TACTICS)
    out: dict = {}
    decode_grid = dict(decode_block_n=[32, 64, 128], decode_num_warps=[4, 8], decode_num_stages=[1, 2, 3],
                       decode_use_dot=[1, 0])
    if KV_DTYPE is not None:  # the tuner's grid for 1-byte caches (llmc/build/tuning.py)
        decode_grid = dict(decode_q8_block_n=[32, 64, 128], decode_q8_num_warps=[4, 8],
                           decode_q8_num_stages=[1, 2, 3])
    grids = {f"decode_b{b}_ctx{c}": (lambda b=b, c=c: decode_case(impl, b, c), "ms", decode_grid)
             for b, c in decode_shapes}
    if prefill:
        grids["prefill_8x2048"] = (lambda: prefill_case(impl, 8, 2048), "llmc_ms", dict(
            prefill_block_m=[64, 128], prefill_block_n=[32, 64, 128], prefill_num_warps=[4, 8],
            prefill_num_stages=[2, 3]))
    for name, (run, key, grid) in grids.items():
        rows = []
        for values in itertools.product(*grid.values()):
            impl.TACTICS.clear()
            impl.TACTICS.update(base)
            impl.TACTICS.update(dict(zip(grid, values)))
            r = guarded(run)
            rows.append({**dict(zip(grid, values)), **{k: r[k] for k in (key, "error") if k in r}})
            print(name, json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress, if cut short
        ok = [r for r in rows if key in r]
        out[name] = {"best": min(ok, key=lambda r: r[key]) if ok else None, "variants": rows}
    impl.TACTICS.clear()
    impl.TACTICS.update(base)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time TACTICS variants")
    ap.add_argument("--quick", action="store_true", help="decode and 8x2048 prefill only")
    ap.add_argument("--kv-dtype", choices=["bf16", "fp8", "int8"], default="bf16",
                    help="K/V cache storage (fp8/int8: per-(token, head) scales, as --kv-cache-dtype)")
    ap.add_argument("--decode-shapes", default="", help="extra decode cases BATCHxCTX,... (swept too)")
    ap.add_argument("--decode-only", action="store_true", help="no prefill cases")
    ap.add_argument("--v-rowmajor", action="store_true",
                    help="1-byte V pages row-major (the layout before head_dim-major V pages), to compare")
    args = ap.parse_args()
    global KV_DTYPE, V_ROWMAJOR
    V_ROWMAJOR = args.v_rowmajor
    KV_DTYPE = {"bf16": None, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[args.kv_dtype]
    shapes_extra = [tuple(int(v) for v in s.split("x")) for s in args.decode_shapes.split(",") if s]
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU: these benchmarks need one"}))
        return
    import triton

    from llmc.plugins import triton_kernels as impl
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "impl": impl.__name__, "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "page": PAGE,
                                                  "dtype": str(DTYPE), "kv_dtype": args.kv_dtype,
                                                  "v_rowmajor": args.v_rowmajor},
                 "tactics": dict(getattr(impl, "TACTICS", {}))}
    res["copy"] = guarded(copy_bandwidth)
    res["decode_b64_ctx4096"] = guarded(decode_case, impl)
    if "GBps" in res["decode_b64_ctx4096"] and "GBps_read_plus_write" in res["copy"]:
        res["decode_b64_ctx4096"]["fraction_of_copy_bw"] = (
            res["decode_b64_ctx4096"]["GBps"] / res["copy"]["GBps_read_plus_write"])
    if not args.quick:
        res["decode_b4_ctx16384"] = guarded(decode_case, impl, batch=4, ctx=16384)
    for b, c in shapes_extra:
        res[f"decode_b{b}_ctx{c}"] = guarded(decode_case, impl, batch=b, ctx=c)
    shapes = [] if args.decode_only else [(8, 2048)] if args.quick else [(8, 2048), (1, 8192), (32, 512)]
    for n_seq, L in shapes:
        res[f"prefill_{n_seq}x{L}"] = guarded(prefill_case, impl, n_seq, L)
    if args.sweep and hasattr(impl, "TACTICS"):
        res["sweep"] = sweep(impl, [(64, 4096)] + shapes_extra, prefill=not args.decode_only)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
