"""Weight-streaming GEMV for decode rows: ``y [M, N] = x [M, K] @ W^T (+ b)`` for a few rows (M <= ``max_m``).

At batch 1 a decode step is a pass over every weight once, so the step time is the weight bytes over the
rate at which the linears stream them. An MMA tile pads one row to 16 (cuBLAS, our ``qgemm`` decode tiling)
and the library GEMMs split K with a second reduction launch; this kernel instead gives each program
``BLOCK_N`` whole weight rows, streams them in ``BLOCK_K`` chunks as 16-byte vector loads and keeps an
element-wise fp32 accumulator on the CUDA cores, reduced once at the end. Programs never share outputs, so
there is no split-K reduction and no atomics: one launch per linear, grid from host ints (graph-capturable).

Weights are 16-bit/fp32 (the unquantized ``Linear`` and the LM head), or 8-bit (int8 / fp8 e4m3) with a
per-output-channel scale applied in the epilogue. Activations are float rows, or per-token quantized rows
(``act_quant.QuantizedRows``: fp8/w8a8) whose scale is applied in the epilogue too, so a quantized product
``q_x * q_w`` is exact in fp32 and the result equals the reference up to summation order. fp8 rows against
fp8 weights multiply in packed f16 by default (``q8_half``): exact products, partial sums of 16 rounded to
f16 (within 1e-3 of the largest output), for fewer instructions and registers per weight.
The CPU reference is ``F.linear`` (or ``QuantLinear``'s forward for 8-bit weights).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from llmc.plugins.triton_compat import INTERPRET as _INTERPRET, pdl_args, pdl_wait

_PTX = tl.constexpr(not _INTERPRET)  # inline PTX compiles for the GPU; the interpreter has none

TACTICS: dict[str, Any] = {
    # 16-bit / fp32 weights. H200 sweep at one row over Llama-2-7B's four projections (quant_gemm_bench.py
    # --sweep-set bf16_m1_stages): 4 x 1024 x 4 warps, activations as one vector, 4 stages 99.4 us in all;
    # the unpipelined 4 x 512 x 4 warps 103.6 us (109.5 in an earlier sweep against cuBLAS's 114.3 us); at 2
    # and 4 rows cuBLAS wins.
    "max_m": 1,         # rows up to this (at most 4) use the GEMV (0: never); more go to cuBLAS
    "block_n": 4,       # weight rows per program
    "block_k": 1024,    # elements per row per load at one activation row (halved per doubling of rows)
    "num_warps": 4,
    "evict_first": 1,   # weights are read once per step: keep L2 for the activations
    "x_vector": 1,      # activations loaded once per tile and broadcast over its rows (_row_product)
    "prefetch": 1,      # load the first weight tile before waiting for the previous kernel (PDL)
    # That tile is the ragged K tail where there is one (none is then loaded after the loop): the f16 products
    # only (h8_tail_first). H200 engine at batch 1, one run (BENCHMARKS.md, ninth session): fp8 2.498 / 2.501
    # ms/step against 2.563 / 2.560, but bf16 3.820 against 3.771 and int8 2.791 against 2.716.
    "tail_first": 0,
    "stages": 4,        # > 1: the K loop is software-pipelined, tiles copied ahead into shared memory (cp.async)
    # 8-bit (int8 / fp8) weights: the CUDA cores convert every byte. H200, fp8 at one row (sweep-set
    # fp8_m1_stages): 8 x 512 x 4 warps, one activation vector, 4 stages 77.2 us; unpipelined 4 x 256 x 8
    # warps 80.2 us; the MMA decode tiling 85.7 us (80.8 tuned); 2 rows 2x slower.
    "q8_max_m": 1,
    "q8_block_n": 8,
    "q8_block_k": 512,
    "q8_num_warps": 4,
    "q8_x_vector": 1,
    "q8_stages": 4,
    # e4m3 rows times e4m3 weights with the products in packed f16 (_row_product's HALF), with tiles of their
    # own (h8_*; the activations always load as one vector). Offline sm_90 at 8 x 512: 107 loop instructions
    # and 64 registers against 155 and 95. H200 engine at batch 1 (BENCHMARKS.md, eighth session): 2.565
    # ms/step at 8 x 1024 x 4 warps, 4 stages, against 2.727 for fp32 products in the same run; 4 x 1024
    # 2.567, 16 x 1024 2.714, 8 x 2048 3.245, 3 stages 2.659.
    "q8_half": 1,
    "h8_block_n": 8,
    "h8_block_k": 1024,
    "h8_num_warps": 4,
    "h8_x_vector": 1,
    "h8_stages": 4,
    "h8_tail_first": 1,
    # W8A8 (int8 activations, SmoothQuant) too: the activations then need converting as well. H200 at one
    # row: 103.9 us against the MMA tiling's 84.8 us, so off unless the tuner finds otherwise.
    "w8a8_gemv": 0,
    # Per weight shape "NxK", what the build-time tuner chose at one row (PER_SHAPE_KEYS: "use" 0|1, "block_n",
    # "block_k", "num_warps", "x_vector", "stages"); missing entries fall back to the keys above. On the H200 the best
    # differs by shape (bf16: the pipelined defaults for QKV, gate/up and the LM head, 16 x 1024 unpipelined for
    # O and down; fp8 once took the MMA tiling for QKV and gate/up), as TensorRT picks a tactic per layer.
    "per_shape": {},
}


@triton.jit
def small_int_to_f32(q):
    """Integers with |q| < 2^22 (int4 nibbles, int8) to fp32 by adding them to the bits of 1.5 * 2^23 and
    subtracting that float: an integer add and an FADD at full rate, where ``I2F`` runs at a quarter."""
    return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _to_f32(v):
    """A loaded tile in fp32; int8 through ``small_int_to_f32`` (no quarter-rate ``I2F``)."""
    if v.dtype == tl.int8:
        return small_int_to_f32(v)
    return v.to(tl.float32)


_E4M3_TO_F16_PTX = tl.constexpr("{ .reg .b16 l, h;\nmov.b32 {l, h}, $2;\ncvt.rn.f16x2.e4m3x2 $0, l;\n"
                                  "cvt.rn.f16x2.e4m3x2 $1, h;\n}")


@triton.jit
def _e4m3_to_f16(v):
    """e4m3 to f16 (exact). On the GPU four bytes at a time from the register they were loaded into, two
    ``cvt.rn.f16x2.e4m3x2``: Triton's own conversion first moves every byte pair apart with a ``PRMT``."""
    if _PTX:
        r = tl.inline_asm_elementwise(_E4M3_TO_F16_PTX, "=r,=r,r", [v], dtype=tl.float16, is_pure=True, pack=4)
    else:
        r = v.to(tl.float16)
    return r


@triton.jit
def _weights(v, HALF: tl.constexpr):
    """A loaded weight tile as the products want it: f16 for ``HALF`` (e4m3 converts exactly), else fp32."""
    if HALF:
        r = _e4m3_to_f16(v)
    else:
        r = _to_f32(v)
    return r


@triton.jit
def _row_product(x_ptr, stride_xm, row: tl.constexpr, M, x_offs, offs_k, w, mask, k_mask,
                 X_VECTOR: tl.constexpr, HALF: tl.constexpr, TAIL: tl.constexpr):
    """Row ``row``'s activations times the weight tile. Loaded in the tile's own [BLOCK_N, BLOCK_K] shape
    (every weight row reads the same addresses, served by L1): no layout conversion through shared memory,
    but each is converted once per weight. ``X_VECTOR``: loaded once as a [BLOCK_K] vector, converted once
    and broadcast over the rows (a shared-memory relayout per tile: pays when a thread holds several rows
    and the conversion is dear, as for fp8).
    ``HALF`` (e4m3 rows times e4m3 weights): the products in packed f16 (``HFMA2``, two per instruction, where
    fp32 needs a conversion and an FMA per weight), the activations scaled by 2^-8 first (exact) so that a
    product is at most 784 and is exact; each run of 16 along K is summed in f16 (at most 12,544, no
    overflow; ~2^-11 relative rounding, far below e4m3's 2^-4) as two chains, even and odd k, so the packed
    adds pair neighbours that share a register (one chain per run made the compiler pair rows instead, a
    ``PRMT`` per ``HFMA2``); returned as fp32 [BLOCK_N, BLOCK_K // 16]."""
    if HALF:
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_mask & (row < M))
        p = (x.to(tl.float16) * 0.00390625)[None, :] * w
        if TAIL:
            p = tl.where(mask, p, tl.zeros_like(p))
        pairs = tl.sum(tl.reshape(p, (p.shape[0], p.shape[1] // 16, 8, 2)), axis=2)  # even and odd k apart
        r = tl.sum(pairs.to(tl.float32), axis=2)
    elif X_VECTOR:
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_mask & (row < M))
        r = _to_f32(x)[None, :] * w
    else:
        x = tl.load(x_ptr + row * stride_xm + x_offs, mask=mask & (row < M))
        r = _to_f32(x) * w
    return r


@triton.jit
def _tile_products(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, x_offs, offs_k, w, mask, k_mask,
                   X_VECTOR: tl.constexpr, BLOCK_M: tl.constexpr, TAIL: tl.constexpr, HALF: tl.constexpr):
    """Each row's products with one weight tile added to its accumulator; ``TAIL`` zeroes the lanes past K
    with ``where`` (a masked load has no defined value, and fp8 has no literal zero for ``other``; ``HALF``
    zeroes them before its f16 sums)."""
    CLEAR: tl.constexpr = TAIL and not HALF
    p = _row_product(x_ptr, stride_xm, 0, M, x_offs, offs_k, w, mask, k_mask, X_VECTOR, HALF, TAIL)
    acc0 += tl.where(mask, p, 0.0) if CLEAR else p
    if BLOCK_M > 1:
        p = _row_product(x_ptr, stride_xm, 1, M, x_offs, offs_k, w, mask, k_mask, X_VECTOR, HALF, TAIL)
        acc1 += tl.where(mask, p, 0.0) if CLEAR else p
    if BLOCK_M > 2:
        p = _row_product(x_ptr, stride_xm, 2, M, x_offs, offs_k, w, mask, k_mask, X_VECTOR, HALF, TAIL)
        acc2 += tl.where(mask, p, 0.0) if CLEAR else p
        p = _row_product(x_ptr, stride_xm, 3, M, x_offs, offs_k, w, mask, k_mask, X_VECTOR, HALF, TAIL)
        acc3 += tl.where(mask, p, 0.0) if CLEAR else p
    return acc0, acc1, acc2, acc3


@triton.jit
def _row_squares(sq0, sq1, sq2, sq3, x_ptr, stride_xm, M, offs_k, k_mask, BLOCK_M: tl.constexpr):
    """Each row's squared activations of one K tile added to a [BLOCK_K] vector: the rows' mean squares for a
    fused RMS norm, from one vector load per row (L1-resident: the products read the same bytes); a few
    registers where summing the tile-shaped activations would take one more accumulator per row."""
    x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    sq0 += x * x
    if BLOCK_M > 1:
        x = tl.load(x_ptr + stride_xm + offs_k, mask=k_mask & (1 < M), other=0.0).to(tl.float32)
        sq1 += x * x
    if BLOCK_M > 2:
        x = tl.load(x_ptr + 2 * stride_xm + offs_k, mask=k_mask & (2 < M), other=0.0).to(tl.float32)
        sq2 += x * x
        x = tl.load(x_ptr + 3 * stride_xm + offs_k, mask=k_mask & (3 < M), other=0.0).to(tl.float32)
        sq3 += x * x
    return sq0, sq1, sq2, sq3


@triton.jit
def _accumulate(acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3, x_ptr, stride_xm, M, x_offs, offs_k, w, mask, k_mask,
                X_VECTOR: tl.constexpr, BLOCK_M: tl.constexpr, TAIL: tl.constexpr, HALF: tl.constexpr,
                NORM: tl.constexpr):
    """One loaded weight tile (K offset already in ``x_ptr``) into the rows' accumulators, and with ``NORM``
    their squares: what each of the GEMV's tile sites (prefetched, looped, ragged tail) does with its tile."""
    acc0, acc1, acc2, acc3 = _tile_products(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, x_offs, offs_k, w, mask,
                                            k_mask, X_VECTOR, BLOCK_M, TAIL, HALF)
    if NORM:
        sq0, sq1, sq2, sq3 = _row_squares(sq0, sq1, sq2, sq3, x_ptr, stride_xm, M, offs_k, k_mask, BLOCK_M)
    return acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3


@triton.jit
def _weight_tile(w_ptr, w_offs, mask, EVICT_FIRST: tl.constexpr):
    if EVICT_FIRST:
        return tl.load(w_ptr + w_offs, mask=mask, eviction_policy="evict_first")
    return tl.load(w_ptr + w_offs, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, r_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_rm,
                 stride_om, eps, X_SCALED: tl.constexpr, W_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 NORM: tl.constexpr, RESIDUAL: tl.constexpr, EVICT_FIRST: tl.constexpr, X_VECTOR: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                 STAGES: tl.constexpr, HALF: tl.constexpr, TAIL_FIRST: tl.constexpr, SWIGLU: tl.constexpr,
                 PDL: tl.constexpr):
    """``BLOCK_N`` output channels for all ``M`` (<= ``BLOCK_M`` <= 4) rows: every weight byte is read once,
    one element-wise accumulator per row. Whole K tiles run unmasked; the ragged tail (K % BLOCK_K, e.g.
    Llama's 11,008) is masked. ``PREFETCH``: the first weight tile is loaded before waiting
    for the previous kernel (weights never change), so the stream starts under its tail; ``TAIL_FIRST``: that
    tile is the ragged tail where there is one (loaded after the pipelined loop, it costs a memory latency
    the pipeline does not hide).
    ``NORM``: the rows are RMS-normalized (weight folded into W) by scaling each row's result by its
    ``rsqrt(mean(x^2) + eps)`` (``_row_squares``), so the norm costs no launch of its own.
    ``RESIDUAL``: ``r [M, N]`` is added to the result (the residual stream, no separate add).
    ``SWIGLU``: W is a fused gate/up projection ``[2N, K]`` (gate rows first) and the output is
    ``silu(gate) * up [M, N]``: each program takes ``BLOCK_N / 2`` gate rows and the up rows ``N`` below them, so
    both halves of its outputs are in its own accumulators and the SwiGLU costs no launch of its own.
    ``STAGES`` > 1: Triton's pipeliner copies the next ``STAGES - 1`` tiles into shared memory (``cp.async``)
    while this one is multiplied, so the bytes in flight no longer cost registers (a register double buffer
    did: fewer programs per SM, measured slower)."""
    if SWIGLU:  # weight rows: BLOCK_N / 2 gate rows, then the up rows of the same outputs
        OUT_N: tl.constexpr = BLOCK_N // 2
        lane = tl.arange(0, BLOCK_N)
        col = tl.program_id(0) * OUT_N + lane % OUT_N
        n_mask = col < N
        offs_n = col + (lane >= OUT_N).to(tl.int32) * N
        offs_o = tl.program_id(0) * OUT_N + tl.arange(0, OUT_N)  # output columns
        o_mask = offs_o < N
    else:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_o, o_mask = offs_n, n_mask
    offs_k = tl.arange(0, BLOCK_K)
    w_offs = offs_n[:, None] * stride_wn + offs_k[None, :]
    x_offs = offs_n[:, None] * 0 + offs_k[None, :]
    full = n_mask[:, None] & (offs_k[None, :] >= 0)
    k_all = offs_k >= 0
    SPAN: tl.constexpr = 16 if HALF else 1  # products summed per accumulator lane per tile
    acc0 = tl.zeros((BLOCK_N, BLOCK_K // SPAN), tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K // SPAN), tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K // SPAN), tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K // SPAN), tl.float32)
    sq0 = tl.zeros((BLOCK_K,), tl.float32)
    sq1 = tl.zeros((BLOCK_K,), tl.float32)
    sq2 = tl.zeros((BLOCK_K,), tl.float32)
    sq3 = tl.zeros((BLOCK_K,), tl.float32)
    k_full = K - K % BLOCK_K
    if PREFETCH:
        if TAIL_FIRST and k_full < K:
            k_tail = (k_full + offs_k) < K
            tail = n_mask[:, None] & k_tail[None, :]
            w = _weights(_weight_tile(w_ptr + k_full, w_offs, tail, EVICT_FIRST), HALF)
            pdl_wait(PDL)
            acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3 = _accumulate(
                acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3, x_ptr + k_full, stride_xm, M, x_offs, offs_k, w, tail,
                k_tail, X_VECTOR, BLOCK_M, True, HALF, NORM)
            k_start = 0
        else:
            w = _weights(_weight_tile(w_ptr, w_offs, full, EVICT_FIRST), HALF)
            pdl_wait(PDL)
            acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3 = _accumulate(
                acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3, x_ptr, stride_xm, M, x_offs, offs_k, w, full, k_all,
                X_VECTOR, BLOCK_M, False, HALF, NORM)
            k_start = BLOCK_K
    else:
        pdl_wait(PDL)
        k_start = 0
    for k0 in tl.range(k_start, k_full, BLOCK_K, num_stages=STAGES):
        w = _weights(_weight_tile(w_ptr + k0, w_offs, full, EVICT_FIRST), HALF)
        acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3 = _accumulate(
            acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3, x_ptr + k0, stride_xm, M, x_offs, offs_k, w, full, k_all,
            X_VECTOR, BLOCK_M, False, HALF, NORM)
    if (not PREFETCH or not TAIL_FIRST) and k_full < K:
        k_tail = (k_full + offs_k) < K
        tail = n_mask[:, None] & k_tail[None, :]
        w = _weights(tl.load(w_ptr + k_full + w_offs, mask=tail), HALF)
        acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3 = _accumulate(
            acc0, acc1, acc2, acc3, sq0, sq1, sq2, sq3, x_ptr + k_full, stride_xm, M, x_offs, offs_k, w, tail,
            k_tail, X_VECTOR, BLOCK_M, True, HALF, NORM)
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0) if W_SCALED else None
    bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) if HAS_BIAS else None
    _store_row(acc0, sq0, 0, M, K, eps, xs_ptr, ws, bias, r_ptr, stride_rm, out_ptr, stride_om, offs_o, o_mask,
               X_SCALED, W_SCALED, HAS_BIAS, NORM, RESIDUAL, HALF, SWIGLU)
    if BLOCK_M > 1:
        _store_row(acc1, sq1, 1, M, K, eps, xs_ptr, ws, bias, r_ptr, stride_rm, out_ptr, stride_om, offs_o,
                   o_mask, X_SCALED, W_SCALED, HAS_BIAS, NORM, RESIDUAL, HALF, SWIGLU)
    if BLOCK_M > 2:
        _store_row(acc2, sq2, 2, M, K, eps, xs_ptr, ws, bias, r_ptr, stride_rm, out_ptr, stride_om, offs_o,
                   o_mask, X_SCALED, W_SCALED, HAS_BIAS, NORM, RESIDUAL, HALF, SWIGLU)
        _store_row(acc3, sq3, 3, M, K, eps, xs_ptr, ws, bias, r_ptr, stride_rm, out_ptr, stride_om, offs_o,
                   o_mask, X_SCALED, W_SCALED, HAS_BIAS, NORM, RESIDUAL, HALF, SWIGLU)


@triton.jit
def _store_row(acc, sq, row: tl.constexpr, M, K, eps, xs_ptr, ws, bias, r_ptr, stride_rm, out_ptr, stride_om,
               offs_o, o_mask, X_SCALED: tl.constexpr, W_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
               NORM: tl.constexpr, RESIDUAL: tl.constexpr, HALF: tl.constexpr, SWIGLU: tl.constexpr):
    """Epilogue of one row: channel scale, token scale, RMS scale, bias, residual, cast, store at the output
    columns ``offs_o`` (rows past ``M`` are skipped); ``HALF`` undoes its 2^-8 activation scale. ``SWIGLU``:
    gate and up are rounded to the output dtype first, as the separate gate/up GEMV stores them for
    ``silu_and_mul``, so the fused result is that kernel's."""
    y = tl.sum(acc, axis=1)
    if HALF:
        y = y * 256.0
    if W_SCALED:
        y = y * ws
    if X_SCALED:
        y = y * tl.load(xs_ptr + row, mask=row < M, other=0.0)
    if NORM:
        y = y * tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
    if HAS_BIAS:
        y += bias
    if RESIDUAL:
        y += tl.load(r_ptr + row * stride_rm + offs_o, mask=o_mask & (row < M), other=0.0).to(tl.float32)
    if SWIGLU:
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        g, u = tl.split(tl.permute(tl.reshape(y, (2, y.shape[0] // 2)), (1, 0)))
        y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_om + offs_o, y.to(out_ptr.dtype.element_ty), mask=o_mask & (row < M))


MAX_ROWS = 4  # the kernel keeps one accumulator per row, up to this many
# what TACTICS["per_shape"] may set per shape
PER_SHAPE_KEYS = ("use", "block_n", "block_k", "num_warps", "x_vector", "stages")


def shape_key(n: int, k: int) -> str:
    """The ``per_shape`` key of a ``[n, k]`` weight."""
    return f"{n}x{k}"


def _width_key(name: str, weight_bytes: int, half: bool = False) -> str:
    """The 16-bit, 8-bit (``q8_``) or f16-products (``h8_``, tiles only) default's key for ``name``."""
    if weight_bytes != 1:
        return name
    return ("h8_" if half and name in PER_SHAPE_KEYS else "q8_") + name


def half_products(x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Whether rows of ``x_dtype`` against weights of ``w_dtype`` multiply in packed f16 (``q8_half``)."""
    return bool(TACTICS["q8_half"]) and x_dtype == w_dtype == torch.float8_e4m3fn


def tail_first(half: bool) -> bool:
    """Whether the GEMV loads the ragged K tail as its first tile (``h8_tail_first`` for the f16 products)."""
    return bool(TACTICS["h8_tail_first" if half else "tail_first"])


def shape_tactics(weight_bytes: int, n: int, k: int, half: bool = False) -> dict[str, int]:
    """The GEMV's choice for a ``[n, k]`` weight (``PER_SHAPE_KEYS``): what the tuner stored for the shape,
    over the defaults of the weight's width (``half``: of the f16 products). An entry without ``stages`` was
    tuned before the loop could be pipelined, so its tiles were timed unpipelined and keep that. A negative
    value keeps the width's default (a hand override of a few keys, ``decode_latency.py --tactic``)."""
    tuned = TACTICS["per_shape"].get(shape_key(n, k), {})
    if tuned and "stages" not in tuned:
        tuned = {"stages": 1, **tuned}
    tuned = {key: v for key, v in tuned.items() if v >= 0}
    return {"use": 1, **{key: TACTICS[_width_key(key, weight_bytes, half)] for key in PER_SHAPE_KEYS[1:]},
            **tuned}


def applies(rows: int, weight_bytes: int = 2, n: int = 0, k: int = 0) -> bool:
    """Whether ``rows`` activation rows against a ``[n, k]`` weight of ``weight_bytes`` per element take the
    GEMV (on a CUDA tensor; the caller checks the device)."""
    limit = min(TACTICS[_width_key("max_m", weight_bytes)], MAX_ROWS)
    return 0 < rows <= limit and bool(shape_tactics(weight_bytes, n, k)["use"])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, norm_eps: float | None = None,
         residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """``(x * x_scale[:, None]) @ (weight * w_scale[:, None])^T + bias (+ residual)`` for ``x [M, K]``,
    ``weight [N, K]``.

    ``x_scale [M]`` / ``w_scale [N]`` (fp32) are given for quantized rows / 8-bit weights; ``out_dtype``
    defaults to ``x``'s dtype (pass the rows' float dtype for quantized ``x``). ``norm_eps``: the rows are
    RMS-normalized first, without a norm weight (fold it into ``weight``: ``reference.norm_linear``);
    ``residual [M, N]``: added to the result (``reference.linear_residual``). ``swiglu``: ``weight`` is a fused
    gate/up ``[2I, K]`` and the result is ``silu_and_mul`` of the product, ``[M, I]`` (``reference.linear_swiglu``)."""
    m, k = x.shape
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"GEMV: x has {k} columns but the weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if swiglu and (weight.shape[0] % 2 or residual is not None):
        raise ValueError(f"GEMV: a fused SwiGLU needs an even number of gate/up rows (got {weight.shape[0]}) "
                         "and no residual")
    if norm_eps is not None and x_scale is not None:
        raise ValueError("GEMV: a fused RMS norm needs float rows, not quantized ones (x_scale)")
    if residual is not None and tuple(residual.shape) != (m, n):
        raise ValueError(f"GEMV: residual {tuple(residual.shape)} does not match the output ({m}, {n})")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    if m > MAX_ROWS:
        raise ValueError(f"GEMV: {m} rows, at most {MAX_ROWS}; larger batches take the MMA GEMMs")
    bm = triton.next_power_of_2(m)
    half = x_scale is not None and half_products(x.dtype, weight.dtype)
    t = shape_tactics(weight.element_size(), weight.shape[0], k, half)  # the tuned tiles of the whole weight
    bn = max(2, t["block_n"]) if swiglu else t["block_n"]  # SwiGLU: half gate rows, half up rows
    bk = max(64, t["block_k"] // bm)  # bm accumulators of bn x bk: keep them in registers
    tail = tail_first(half)
    dummy = weight
    pdl = pdl_args(x)
    _gemv_kernel[(triton.cdiv(n, bn // 2 if swiglu else bn),)](
        x, x_scale if x_scale is not None else dummy, weight, w_scale if w_scale is not None else dummy,
        bias if bias is not None else dummy, residual if residual is not None else dummy, out, m, n, k,
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        float(norm_eps or 0.0), X_SCALED=x_scale is not None, W_SCALED=w_scale is not None,
        HAS_BIAS=bias is not None, NORM=norm_eps is not None, RESIDUAL=residual is not None,
        EVICT_FIRST=bool(TACTICS["evict_first"]) and not _INTERPRET, X_VECTOR=bool(t["x_vector"]), BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, PREFETCH=bool(TACTICS["prefetch"]) and (tail or k >= bk),
        TAIL_FIRST=tail, SWIGLU=swiglu,
        STAGES=t["stages"], HALF=half, num_warps=t["num_warps"], num_stages=t["stages"], **pdl)
    return out
