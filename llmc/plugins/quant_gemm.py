"""Triton GEMMs for quantized linears on the GPU (the CPU references are ``QuantLinear``'s own forwards).

One kernel, ``y = x W^T (+ b)``, reads the weight in its stored layout (``docs/quantization.md``) and
dequantizes in registers, so a decode step streams 1 byte (int8/fp8) or ~0.53 byte (int4 + group scales)
per weight instead of 2:

- int8 / fp8 weight, per-output-channel scale: ``acc += x_tile @ q_tile^T`` on the raw integers, the
  channel scale is applied once in the epilogue;
- int4 group-wise (two nibbles per byte along K, even index low): each K tile lies inside one group
  (``GROUP % BLOCK_K == 0``), so ``acc += (x_tile @ (q - zero)^T) * scale[group]``: the tensor cores see
  small exact integers (``16 + q``, written into 16-bit floats' mantissas, ``_nibbles``), never a rounded
  dequantized weight. The low nibbles meet the even inputs and the high nibbles the odd ones in two
  half-width dots, so the packed tile is never interleaved. The fewest int4 rows take a CUDA-core GEMV
  instead (``_int4_gemv_kernel``: int32 words whose nibbles become exact ``n - 8`` in fp16 pairs, multiplied
  by the inputs scaled per tile by a power of two into fp16, one ``HFMA2`` per two weights; tiles per weight
  shape);
- activations are either the float input (weight-only methods; AWQ's ``input_scale`` is divided in the
  tile) or a per-token quantized copy (fp8 E4M3 / int8, made by ``_act_quant_kernel``), in which case
  ``acc`` is also multiplied by the token's scale. The dots then run on the 8-bit operands themselves
  (int8 x int8 -> int32, e4m3 x e4m3 -> fp32 tensor-core instructions), exact per tile, so the result
  equals the reference's up to summation order.

The fewest rows of int8/fp8 weights (``gemv.TACTICS["q8_max_m"]``, per shape as tuned) stream the weight
through ``gemv.py`` on the CUDA cores instead. Other small batches (decode: M <= 64) pad M to a 16..64-row
tile and, where the grid over N alone would leave SMs idle, split K across programs whose fp32 partials a
second kernel sums (adding the bias and casting).
Large batches (prefill) use 64-row tiles; FP8 with many rows goes to ``torch._scaled_mm`` (cuBLASLt
row-wise scaling, FP8 tensor cores) and W8A8 to ``torch._int_mm`` where they apply. Every launch takes its
grid from host ints (tensor shapes), so a step stays capturable in a CUDA graph.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from llmc.plugins import gemv
from llmc.plugins.gemv import small_int_to_f32
from llmc.plugins.act_quant import (QUANTIZED_INPUT_METHODS, QuantizedRows, check_quantized_input, empty_rows,
                                    quantize_rows)
from llmc.plugins.triton_compat import INTERPRET as _INTERPRET, pdl_args, pdl_wait, row_warps

TACTICS: dict[str, Any] = {
    "gemv_max_m": 2,            # int4 rows up to this run one CUDA-core GEMV per row
    "gemv_block_n": 16,         # int4 GEMV tile. H200, synthetic Llama-2-7B engine at batch 1 (ms/step), fp16 pairs:
    "gemv_block_k": 4096,       # 16 x 4096 x 8 warps 2.389, 16 x 2048 x 4 2.482, 32 x 1024 x 4 2.507, 64 x 512 x 4
    "gemv_num_warps": 8,        # 3.057; fp32 words at 64 x 512 (the last default) 3.299. By the grids, 64-row tiles
                                # filled under one wave of the SMs (gate/up: 344 programs against 1,376)
    "gemv_num_stages": 1,       # > 1: the K loop pipelined through shared memory (cp.async; as gemv.py's stages)
    "gemv_words": 3,            # packed int4 read as int32 words: 3, in fp16 pairs (HFMA2) on the inputs scaled per
                                # tile by a power of two; 2 / 1, 8 nibbles masked in place in fp32, the inputs as one
                                # vector split in registers / 8 strided loads; 0: bytes
    "small_m": 64,              # rows up to this use the decode tiling (16..64-row tiles)
    "small_swap": 1,            # decode tiling computes out^T = W x^T (weight as the wide MMA operand)
    "small_block_n": 32,
    "small_block_k": 128,
    "small_num_warps": 4,
    "small_num_stages": 4,
    "small_target_programs": 264,  # ~2 per SM of an H100: split K until the grid reaches this
    "small_max_split_k": 8,
    "uneven_split": 1,          # K may split into unequal whole-tile parts (0: equal power-of-two parts only)
    "large_block_m": 64,
    "large_block_n": 128,
    "large_block_k": 64,
    "large_num_warps": 4,
    "large_num_stages": 3,
    "fuse_act_quant": 0,        # decode rows: quantize fp8/int8 activations inside the GEMM (H100: 1.5x
                                # slower than the separate kernel, the per-program absmax pass costs more)
    "act_quant_row": 16384,     # per-token quantization keeps rows up to this wide in registers (one pass)
    "native_dot": 1,            # fp8/int8 activations: dot on the quantized operands (else via bf16)
    "int4_dequant_min_m": 128,  # int4 rows from which the weight is dequantized to bf16 for cuBLAS (0: never)
    "scaled_mm_min_m": 65,      # fp8 rows from which cuBLASLt's FP8 GEMM is used (0 disables). H200, 7B's four
                                # projections at 32 + 64 rows: decode tiling 0.175 ms, cuBLASLt from 17: 0.238
    "int_mm_min_m": 17,         # w8a8 rows from which torch._int_mm is used (it needs M > 16)
    # Per int4 weight shape "NxK", the GEMV tiles the build-time tuner chose at one row (PER_SHAPE_KEYS); missing
    # entries take the gemv_* defaults. H200 sweep: QKV 32 x 512 x 4 warps, O 64 x 512 x 8, gate/up 64 x 512 x 4,
    # down 128 x 512 x 8 (66.3 us in all against 71.9 at the defaults).
    "per_shape": {},
}
PER_SHAPE_KEYS = ("gemv_block_n", "gemv_block_k", "gemv_num_warps", "gemv_num_stages")


@triton.jit
def round_e4m3(x):
    """Round fp32 ``x`` (|x| <= 448) to the nearest-even fp8 e4m3 value, still in fp32. The Triton 3.6
    interpreter's fp32 -> fp8 cast drops the carry when rounding crosses a power of two (31.8 -> 16); values
    already on the e4m3 grid convert exactly, so interpreter runs round first. Normals keep 3 mantissa bits
    (bit trick on the fp32 pattern); below 2^-6 the grid is 2^-9, rounded by adding and removing 1.5 * 2^14."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFFF + ((b >> 20) & 1)) & -1048576  # -1048576 = ~0xFFFFF: clear 20 of 23 mantissa bits
    sub = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, sub, b.to(tl.float32, bitcast=True))


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def act_scale(amax, IS_FP8: tl.constexpr):
    """Per-token scale from a row's absmax, as ``quant_linear``: fp8 maps it to 448, int8 to 127."""
    if IS_FP8:
        return tl.maximum(amax, 1e-12) / 448.0
    return tl.maximum(amax, 1e-8) / 127.0


@triton.jit
def act_values(v, out_ty, IS_FP8: tl.constexpr, ROUND_FP8: tl.constexpr):
    """``v`` (already divided by its scale) as stored: e4m3 saturated at 448 (``ROUND_FP8``: rounded first,
    for the interpreter's faulty cast), or int8 rounded half to even and clamped to -127..127."""
    if IS_FP8:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if ROUND_FP8:
            v = round_e4m3(v)
    else:
        v = tl.minimum(tl.maximum(_round_half_even(v), -127.0), 127.0)
    return v.to(out_ty)  # one return: compiled Triton refuses branches returning different types


@triton.jit
def _act_quant_kernel(x_ptr, isc_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                      IS_FP8: tl.constexpr, HAS_ISC: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row: ``s = absmax(x / isc) / QMAX``, ``q = quantize(x / isc / s)`` as in ``quant_linear``.
    ``BLOCK >= K``: the row stays in registers, one load; else two passes (the second from L2)."""
    pdl_wait(PDL)
    row = tl.program_id(0)
    if BLOCK >= K:
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_ISC:
            v = v / tl.load(isc_ptr + offs, mask=offs < K, other=1.0)
        s = act_scale(tl.max(tl.abs(v), axis=0), IS_FP8)
        tl.store(s_ptr + row, s)
        tl.store(q_ptr + row * stride_qm + offs, act_values(v / s, q_ptr.dtype.element_ty, IS_FP8, False),
                 mask=offs < K)
        return
    amax = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_ISC:
            v = v / tl.load(isc_ptr + offs, mask=offs < K, other=1.0)
        amax = tl.maximum(amax, tl.abs(v))
    s = act_scale(tl.max(amax, axis=0), IS_FP8)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_ISC:
            v = v / tl.load(isc_ptr + offs, mask=offs < K, other=1.0)
        tl.store(q_ptr + row * stride_qm + offs, act_values(v / s, q_ptr.dtype.element_ty, IS_FP8, False),
                 mask=offs < K)


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def _nibbles_ptx(lo_shift: tuple, hi_shift: tuple, mask: str, magic: str) -> tl.constexpr:
    """PTX for ``_nibbles`` on 4 packed bytes ($4): low nibbles to $0 $1, high to $2 $3 (two 16-bit lanes each)."""
    return tl.constexpr(
        "{ .reg .b32 t0, t1, s;\n"
        "prmt.b32 t0, $4, 0, 0x4140;\n"  # bytes 0 and 1 into the two 16-bit lanes
        "prmt.b32 t1, $4, 0, 0x4342;\n"  # bytes 2 and 3
        + "".join(f"{shift} s, {t}, {n};\nlop3.b32 ${out}, s, {mask}, {magic}, 0xEA;\n"  # (s & mask) | magic
                  for out, (t, (shift, n)) in enumerate([("t0", lo_shift), ("t1", lo_shift), ("t0", hi_shift),
                                                          ("t1", hi_shift)]))
        + "}")


_PTX = tl.constexpr(not _INTERPRET)  # inline PTX compiles for the GPU; the interpreter has none
_NIBBLES_BF16_PTX = _nibbles_ptx(("shl.b32", 3), ("shr.u32", 1), "0x00780078", "0x43004300")
_NIBBLES_FP16_PTX = _nibbles_ptx(("shl.b32", 6), ("shl.b32", 2), "0x03C003C0", "0x4C004C00")


@triton.jit
def _nibbles(wp, cdt: tl.constexpr):
    """Both nibbles ``n`` of packed bytes as floats ``c * (16 + n)``, exact, by writing each nibble into the
    top four mantissa bits of a fixed exponent (``c`` = 8 for bf16, 1 for fp16, 2^19 for fp32): two integer
    ops a nibble instead of a quarter-rate ``I2F``. ``_nibble_sums`` removes ``c`` and the offset 16 per group
    with ``sum x``; the offset keeps each term within 2x of the nibble's own, so the fp32 sums lose at most a
    bit to it. On the GPU the 16-bit cases run as inline PTX on 4 bytes at a time (two ``PRMT`` spread them
    into 16-bit lanes, then a shift and a ``LOP3`` make two nibbles each); the interpreter runs the same
    arithmetic as Triton ops."""
    if _PTX and cdt == tl.bfloat16:
        return tl.inline_asm_elementwise(_NIBBLES_BF16_PTX, "=r,=r,=r,=r,r", [wp], dtype=(tl.bfloat16, tl.bfloat16),
                                         is_pure=True, pack=4)
    if _PTX and cdt == tl.float16:
        return tl.inline_asm_elementwise(_NIBBLES_FP16_PTX, "=r,=r,=r,=r,r", [wp], dtype=(tl.float16, tl.float16),
                                         is_pure=True, pack=4)
    if cdt == tl.bfloat16:  # 0x4300 = 128.0, mantissa bits 3..6
        w = wp.to(tl.int16)
        lo = ((w << 3) & 0x78) | 0x4300
        hi = ((w >> 1) & 0x78) | 0x4300
    elif cdt == tl.float16:  # 0x4C00 = 16.0, mantissa bits 6..9
        w = wp.to(tl.int16)
        lo = ((w << 6) & 0x3C0) | 0x4C00
        hi = ((w << 2) & 0x3C0) | 0x4C00
    else:  # 0x4B000000 = 2^23, mantissa bits 19..22
        w = wp.to(tl.int32)
        lo = ((w << 19) & 0x780000) | 0x4B000000
        hi = ((w << 15) & 0x780000) | 0x4B000000
    return lo.to(cdt, bitcast=True), hi.to(cdt, bitcast=True)


@triton.jit
def _nibble_sums(part, cdt: tl.constexpr):
    """``sum c * (16 + n) x`` from ``_nibbles`` to ``sum (16 + n) x``."""
    if cdt == tl.bfloat16:
        return part * 0.125
    elif cdt == tl.float16:
        return part
    else:
        return part * (1.0 / 524288.0)


@triton.jit(do_not_specialize=["M"])  # the row count varies per step: never recompile for it
def _qgemm_kernel(x_ptr, xs_ptr, isc_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr,
                  M, N, K, k_per_split, stride_xm, stride_wn, stride_sg, stride_om,
                  W_INT4: tl.constexpr, GROUP: tl.constexpr, X_QUANT: tl.constexpr, HAS_ISC: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, NATIVE_DOT: tl.constexpr,
                  SWAP: tl.constexpr, FUSE_ACT: tl.constexpr, ACT_FP8: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """``FUSE_ACT``: ``x`` is the float input and each program quantizes its rows itself (a first pass for
    the per-token absmax, then quantize-on-load), saving the activation-quantization launch per linear.
    ``SWAP`` computes ``out^T = W x^T``: the weight tile is the MMA's wide left operand (it can stay in
    registers on Hopper) and the few activation rows its narrow right one; the accumulator is [N, M]."""
    pdl_wait(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    cdt = tl.float32 if IEEE else (tl.bfloat16 if X_QUANT else x_ptr.dtype.element_ty)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if FUSE_ACT:  # per-token absmax over the whole row (the same for every program of this row tile)
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
            v = v.to(tl.float32)
            if HAS_ISC:
                v = v / tl.load(isc_ptr + offs_k)[None, :]
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
        if ACT_FP8:
            x_scale = tl.maximum(amax, 1e-12) / 448.0
        else:
            x_scale = tl.maximum(amax, 1e-8) / 127.0
    # each split owns whole tiles (no K masks); the last may own fewer (K need not divide evenly)
    for i in range(0, tl.minimum(k_per_split, K - pid_k * k_per_split), BLOCK_K):
        k0 = pid_k * k_per_split + i
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # masked rows/columns only reach outputs that are never stored (no ``other``: fp8 has no literal 0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None])
        if HAS_ISC:
            x = x.to(tl.float32) / tl.load(isc_ptr + offs_k)[None, :]
        if FUSE_ACT:
            v = x.to(tl.float32) / x_scale[:, None]
            if ACT_FP8:
                x = tl.minimum(tl.maximum(v, -448.0), 448.0).to(w_ptr.dtype.element_ty)
            else:
                x = tl.minimum(tl.maximum(_round_half_even(v), -127.0), 127.0).to(tl.int8)
        if W_INT4:
            # low nibbles hold the even inputs, high the odd: split x instead of interleaving the weight.
            # sum_k (q - z) x = sum_k (16 + q) x - (z + 16) sum_k x: the MMAs see 16 + q, exact in 16 bits.
            xe, xo = tl.split(tl.reshape(x.to(cdt), (BLOCK_M, BLOCK_K // 2, 2)))
            offs_j = tl.arange(0, BLOCK_K // 2)
            wp = tl.load(w_ptr + offs_n[:, None] * stride_wn + k0 // 2 + offs_j[None, :], mask=n_mask[:, None],
                         other=0)
            g = k0 // GROUP
            z = small_int_to_f32(tl.load(z_ptr + g * stride_sg + offs_n, mask=n_mask, other=0))
            sc = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0)
            lo, hi = _nibbles(wp, cdt)
            xsum = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)
            if SWAP:
                part = _mm(lo, tl.trans(xe), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), IEEE)
                part = _mm(hi, tl.trans(xo), part, IEEE)
                acc += (_nibble_sums(part, cdt) - (z[:, None] + 16.0) * xsum[None, :]) * sc[:, None]
            else:
                part = _mm(xe, tl.trans(lo), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE)
                part = _mm(xo, tl.trans(hi), part, IEEE)
                acc += (_nibble_sums(part, cdt) - xsum[:, None] * (z[None, :] + 16.0)) * sc[None, :]
        else:
            q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_mask[:, None])
            if not NATIVE_DOT:
                x, q = x.to(cdt), q.to(cdt)
            # NATIVE_DOT: fp8 x fp8 -> fp32 or int8 x int8 -> int32 on the tensor cores, exact per tile
            if SWAP:
                acc += _mm(q, tl.trans(x), None, IEEE).to(tl.float32)
            else:
                acc += _mm(x, tl.trans(q), None, IEEE).to(tl.float32)
    if SWAP:
        acc = tl.trans(acc)
    if not W_INT4:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if FUSE_ACT:
        acc = acc * x_scale[:, None]
    elif X_QUANT:
        acc = acc * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT > 1:
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _nibble_at(v, MASK: tl.constexpr):
    """``v & MASK`` (one nibble in place) as an exact float: OR'd into the mantissa of 2^23, minus 2^23. On
    the GPU the mask and the OR are one ``LOP3`` (Triton emits two integer ops)."""
    if _PTX:
        f = tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {MASK}, 0x4B000000, 0xEA;", "=r,r", [v], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        f = ((v & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
    return f - 8388608.0


# Nibbles j and j + 4 of a word sit in its two 16-bit halves at the same place, so one LOP3 writes both into the
# mantissa of 1024.0 (the low nibble of a byte as 1024 + n, the high one as 1024 + 16 n) and one HSUB2 / HFMA2
# makes them n - 8, exactly; the word's other byte pair comes after one shift by 8 (Marlin's dequantization).
_WORD_DOT_F16X2_PTX = tl.constexpr(
    "{ .reg .b32 t, a, c, o, r, m; .reg .b16 l, h; .reg .f32 fl, fh;\n"
    "mov.b32 o, 0x64086408;\nmov.b32 r, 0x2C002C00;\nmov.b32 m, 0xD480D480;\n"  # f16x2 takes no immediates
    "shr.u32 t, $1, 8;\n"
    + "".join(f"lop3.b32 a, {src}, {mask}, 0x64006400, 0xEA;\n" + fix
              + ("mul.rn.f16x2 c, a, $2;\n" if j == 0 else f"fma.rn.f16x2 c, a, ${j + 2}, c;\n")
              for j, (src, mask, fix) in enumerate([
                  ("$1", "0x000F000F", "sub.rn.f16x2 a, a, o;\n"),       # - 1032
                  ("$1", "0x00F000F0", "fma.rn.f16x2 a, a, r, m;\n"),    # / 16 - 72
                  ("t", "0x000F000F", "sub.rn.f16x2 a, a, o;\n"),
                  ("t", "0x00F000F0", "fma.rn.f16x2 a, a, r, m;\n")]))
    + "mov.b32 {l, h}, c;\ncvt.f32.f16 fl, l;\ncvt.f32.f16 fh, h;\nadd.f32 $0, fl, fh; }")


@triton.jit
def _pack_f16x2(lo, hi):
    """Two fp16 tensors as one int32 tensor of ``(lo, hi)`` 16-bit lanes (an ``f16x2`` operand)."""
    return lo.to(tl.uint16, bitcast=True).to(tl.int32) | (hi.to(tl.uint16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _lane(wv, SHIFT: tl.constexpr):
    """The nibble at bit ``SHIFT`` of each word as the fp16 ``n - 8`` (the interpreter's ``_word_dot_f16x2``)."""
    return (((wv >> SHIFT) & 0xF) - 8).to(tl.float16)


@triton.jit
def _word_dot_f16x2(wv, h0, h1, h2, h3, h4, h5, h6, h7):
    """``sum_j (n_j - 8) h_j`` over the 8 nibbles of each int32 word (``h_j`` fp16 ``[W]``, broadcast over
    rows) on fp16 pairs: nibbles ``j`` and ``j + 4`` become ``n - 8`` in two lanes (exact small integers,
    ``_WORD_DOT_F16X2_PTX``) that one ``HFMA2`` multiplies; the word's two lane sums are added in fp32. About
    2 instructions a weight against the fp32 path's 3. The interpreter runs the same lanes as Triton ops (a
    multiply and an add each, so not bit-exact)."""
    if _PTX:
        return tl.inline_asm_elementwise(_WORD_DOT_F16X2_PTX, "=r,r,r,r,r,r",
                                         [wv, _pack_f16x2(h0, h4)[None, :], _pack_f16x2(h1, h5)[None, :],
                                          _pack_f16x2(h2, h6)[None, :], _pack_f16x2(h3, h7)[None, :]],
                                         dtype=tl.float32, is_pure=True, pack=1)
    lo = (_lane(wv, 0) * h0[None, :] + _lane(wv, 4) * h1[None, :] + _lane(wv, 8) * h2[None, :]
          + _lane(wv, 12) * h3[None, :])
    hi = (_lane(wv, 16) * h4[None, :] + _lane(wv, 20) * h5[None, :] + _lane(wv, 24) * h6[None, :]
          + _lane(wv, 28) * h7[None, :])
    return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def _pow2_scales(amax):
    """``(up, down)``: powers of two with ``amax * up`` in [128, 256) and ``down = 1 / up``, so a tile's inputs
    fit fp16 exactly (bf16's 8 mantissa bits), with room for a word's sums (8 * 8 * 256 < 65,504), whatever
    their range in bf16."""
    p = tl.minimum(tl.maximum(134 - (amax.to(tl.int32, bitcast=True) >> 23), -120), 120)  # 7 - floor(log2 amax)
    return ((p + 127) << 23).to(tl.float32, bitcast=True), ((127 - p) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _eighths(x):
    """``x [8 * W]`` -> its eight strided parts ``x[j::8]`` (``[W]`` each), by splitting a reshape."""
    s0, s1 = tl.split(tl.reshape(x, (x.shape[0] // 8, 2, 2, 2)))  # [w, a, b1, b0]: k = 8w + 4a + 2b1 + b0
    s00, s01 = tl.split(s0)
    s10, s11 = tl.split(s1)
    x0, x4 = tl.split(s00)
    x2, x6 = tl.split(s01)
    x1, x5 = tl.split(s10)
    x3, x7 = tl.split(s11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _tile_input(x_ptr, isc_ptr, row, stride_xm, k0, K, STEP: tl.constexpr, HAS_ISC: tl.constexpr,
                MASK_K: tl.constexpr, LEN: tl.constexpr):
    """``x[row, k0 + STEP * i]`` for ``i < LEN`` in fp32, divided by the input scale if any; zero from ``K``."""
    offs = k0 + STEP * tl.arange(0, LEN) if STEP > 1 else k0 + tl.arange(0, LEN)
    if MASK_K:
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_ISC:
            x = x / tl.load(isc_ptr + offs, mask=offs < K, other=1.0)
    else:
        x = tl.load(x_ptr + row * stride_xm + offs).to(tl.float32)
        if HAS_ISC:
            x = x / tl.load(isc_ptr + offs)
    return x


@triton.jit
def _strided_inputs(x_ptr, isc_ptr, row, stride_xm, k0, K, HAS_ISC: tl.constexpr, MASK_K: tl.constexpr,
                    W: tl.constexpr):
    """``x[row, k0 + j::8]`` (``W`` each) for j = 0..7, as eight strided loads."""
    return (_tile_input(x_ptr + 0, isc_ptr + 0, row, stride_xm, k0, K, 8, HAS_ISC, MASK_K, W),
            _tile_input(x_ptr + 1, isc_ptr + 1, row, stride_xm, k0, K - 1, 8, HAS_ISC, MASK_K, W),
            _tile_input(x_ptr + 2, isc_ptr + 2, row, stride_xm, k0, K - 2, 8, HAS_ISC, MASK_K, W),
            _tile_input(x_ptr + 3, isc_ptr + 3, row, stride_xm, k0, K - 3, 8, HAS_ISC, MASK_K, W),
            _tile_input(x_ptr + 4, isc_ptr + 4, row, stride_xm, k0, K - 4, 8, HAS_ISC, MASK_K, W),
            _tile_input(x_ptr + 5, isc_ptr + 5, row, stride_xm, k0, K - 5, 8, HAS_ISC, MASK_K, W),
            _tile_input(x_ptr + 6, isc_ptr + 6, row, stride_xm, k0, K - 6, 8, HAS_ISC, MASK_K, W),
            _tile_input(x_ptr + 7, isc_ptr + 7, row, stride_xm, k0, K - 7, 8, HAS_ISC, MASK_K, W))


@triton.jit
def _int4_gemv_tile(x_ptr, isc_ptr, w_ptr, s_ptr, z_ptr, row, k0, K, stride_xm, stride_wn, stride_sg, offs_n, n_mask,
                    GROUP: tl.constexpr, HAS_ISC: tl.constexpr, WORDS: tl.constexpr, MASK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K tile's ``sum_k (q - z) * scale * x`` for ``BLOCK_N`` rows. ``MASK_K``: the tile is ragged (past K
    its weights, scales and inputs read as zero); whole tiles are unmasked along K, so the packed weight is
    read in 16-byte vectors (a per-element K mask made every load a single byte)."""
    NG: tl.constexpr = BLOCK_K // GROUP
    offs_g = tl.arange(0, NG)
    if WORDS:
        offs_w = tl.arange(0, BLOCK_K // 8)
        kw = k0 + 8 * offs_w
        wmask = n_mask[:, None] & (kw < K)[None, :] if MASK_K else n_mask[:, None]
        w0 = tl.multiple_of(k0 // 8, BLOCK_K // 8)  # tiles start at multiples of BLOCK_K: 16-byte loads
        wv = tl.load(w_ptr + offs_n[:, None] * stride_wn + w0 + offs_w[None, :], mask=wmask, other=0,
                     eviction_policy="evict_first")
        if WORDS == 3:  # fp16 pairs (_word_dot_f16x2) on the tile's inputs scaled by a power of two
            x = _tile_input(x_ptr, isc_ptr, row, stride_xm, k0, K, 1, HAS_ISC, MASK_K, BLOCK_K)
            up, down = _pow2_scales(tl.max(tl.abs(x), axis=0))  # fp16 range
            h0, h1, h2, h3, h4, h5, h6, h7 = _eighths((x * up).to(tl.float16))
            t = _word_dot_f16x2(wv, h0, h1, h2, h3, h4, h5, h6, h7)
            xsum = tl.sum(tl.reshape(x, (NG, GROUP)), axis=1)
            d = tl.sum(tl.reshape(t, (BLOCK_N, NG, GROUP // 8)), axis=2) * down + 8.0 * xsum[None, :]
        else:
            # fp32: nibble j is masked in place, so it reads as 16^p * n (p = j, or j - 3 for j >= 5 after one
            # shift by 12), and its input is prescaled by 16^-p instead
            hi = wv >> 12
            if WORDS == 2:  # the tile's inputs as one vector load, split into the eight strided parts
                x0, x1, x2, x3, x4, x5, x6, x7 = _eighths(_tile_input(x_ptr, isc_ptr, row, stride_xm, k0, K, 1,
                                                                      HAS_ISC, MASK_K, BLOCK_K))
            else:
                x0, x1, x2, x3, x4, x5, x6, x7 = _strided_inputs(x_ptr, isc_ptr, row, stride_xm, k0, K, HAS_ISC,
                                                                 MASK_K, BLOCK_K // 8)
            t = _nibble_at(wv, 0xF) * x0[None, :]
            t += _nibble_at(wv, 0xF0) * (x1 * 0.0625)[None, :]
            t += _nibble_at(wv, 0xF00) * (x2 * 0.00390625)[None, :]
            t += _nibble_at(wv, 0xF000) * (x3 * 0.000244140625)[None, :]
            t += _nibble_at(wv, 0xF0000) * (x4 * 0.0000152587890625)[None, :]
            t += _nibble_at(hi, 0xF00) * (x5 * 0.00390625)[None, :]
            t += _nibble_at(hi, 0xF000) * (x6 * 0.000244140625)[None, :]
            t += _nibble_at(hi, 0xF0000) * (x7 * 0.0000152587890625)[None, :]
            d = tl.sum(tl.reshape(t, (BLOCK_N, NG, GROUP // 8)), axis=2)  # [BLOCK_N, NG]
            xsum = tl.sum(tl.reshape(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, (NG, GROUP // 8)), axis=1)
    else:
        x = _tile_input(x_ptr, isc_ptr, row, stride_xm, k0, K, 1, HAS_ISC, MASK_K, BLOCK_K)
        xe, xo = tl.split(tl.reshape(x, (BLOCK_K // 2, 2)))
        offs_j = tl.arange(0, BLOCK_K // 2)
        wmask = n_mask[:, None] & (k0 + 2 * offs_j < K)[None, :] if MASK_K else n_mask[:, None]
        wp = tl.load(w_ptr + offs_n[:, None] * stride_wn + k0 // 2 + offs_j[None, :], mask=wmask, other=0)
        lo = tl.reshape(small_int_to_f32(wp & 0xF), (BLOCK_N, NG, GROUP // 2))
        hi = tl.reshape(small_int_to_f32(wp >> 4), (BLOCK_N, NG, GROUP // 2))
        xe3 = tl.reshape(xe, (NG, GROUP // 2))
        xo3 = tl.reshape(xo, (NG, GROUP // 2))
        d = tl.sum(lo * xe3[None, :, :] + hi * xo3[None, :, :], axis=2)
        xsum = tl.sum(xe3 + xo3, axis=1)
    gp = (k0 // GROUP + offs_g)[None, :] * stride_sg + offs_n[:, None]
    gmask = n_mask[:, None] & (k0 + offs_g * GROUP < K)[None, :] if MASK_K else n_mask[:, None]  # whole groups
    z = small_int_to_f32(tl.load(z_ptr + gp, mask=gmask, other=0))
    sc = tl.load(s_ptr + gp, mask=gmask, other=0.0)
    return tl.sum((d - z * xsum[None, :]) * sc, axis=1)


@triton.jit(do_not_specialize=["M"])
def _int4_gemv_kernel(x_ptr, isc_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, M, N, K, k_per_split,
                      stride_xm, stride_wn, stride_sg, stride_om, GROUP: tl.constexpr, HAS_ISC: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, WORDS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    """One activation row against ``BLOCK_N`` int4 rows on the CUDA cores (no MMA padding to 16 rows).
    A K tile spans ``BLOCK_K // GROUP`` whole groups; per group ``sum (q - z) x = sum q x - z sum x``.
    ``WORDS``: read the packed weight as int32 words of 8 nibbles (k = 8 * word + nibble), the inputs as one
    vector split in registers (2) or eight strided loads (1); 0: as bytes.
    A split runs its whole tiles unmasked, then at most one ragged tile (K % BLOCK_K); the last split may
    hold fewer tiles than the others, or none."""
    pdl_wait(PDL)
    row, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    k_full = k_start + tl.maximum(k_stop - k_start, 0) // BLOCK_K * BLOCK_K
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in tl.range(k_start, k_full, BLOCK_K, num_stages=STAGES):
        acc += _int4_gemv_tile(x_ptr, isc_ptr, w_ptr, s_ptr, z_ptr, row, k0, K, stride_xm, stride_wn, stride_sg,
                               offs_n, n_mask, GROUP, HAS_ISC, WORDS, False, BLOCK_N, BLOCK_K)
    if k_full < k_stop:
        acc += _int4_gemv_tile(x_ptr, isc_ptr, w_ptr, s_ptr, z_ptr, row, k_full, K, stride_xm, stride_wn,
                               stride_sg, offs_n, n_mask, GROUP, HAS_ISC, WORDS, True, BLOCK_N, BLOCK_K)
    if SPLIT > 1:
        tl.store(part_ptr + (pid_k * M + row) * N + offs_n, acc, mask=n_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, stride_om, SPLIT: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + (s * M + row) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _pow2_at_most(n: int, cap: int) -> int:
    p = 16
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def quantize_activations(x: torch.Tensor, method: str, input_scale: torch.Tensor | None):
    """Per-token fp8 (``fp8``) or int8 (``w8a8``) quantization of ``x [M, K]``: ``(q, scale [M] fp32)``."""
    m, k = x.shape
    is_fp8 = method == "fp8"
    if is_fp8 and _INTERPRET:  # Triton 3.6's interpreter rounds fp32 -> e4m3 wrongly at binade edges
        rows = quantize_rows(x, method, input_scale)
        return rows.q, rows.scale
    q, s = empty_rows(m, k, method, x.device)
    if m:
        # a decode row is one program, on the step's critical path: the whole row in registers (one load)
        # where the former 1,024-wide loop made 2 * K / 1,024 dependent round trips to memory
        block = triton.next_power_of_2(k) if k <= TACTICS["act_quant_row"] else 1024
        _act_quant_kernel[(m,)](x, input_scale if input_scale is not None else s, q, s, k, x.stride(0), q.stride(0),
                                IS_FP8=is_fp8, HAS_ISC=input_scale is not None, BLOCK=block,
                                num_warps=row_warps(block), **pdl_args(x))
    return q, s


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, stride_wn, stride_sg, stride_on, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """``out[n, k] = (q[n, k] - zero[k // G, n]) * scale[k // G, n]`` for one [BLOCK_N, BLOCK_K] tile."""
    pdl_wait(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_j = tl.arange(0, BLOCK_K // 2)
    n_mask = offs_n < N
    wp = tl.load(w_ptr + offs_n[:, None] * stride_wn + k0 // 2 + offs_j[None, :], mask=n_mask[:, None], other=0)
    g = k0 // GROUP
    z = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
    sc = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0)[:, None]
    lo = ((wp & 0xF).to(tl.float32) - z) * sc
    hi = ((wp >> 4).to(tl.float32) - z) * sc
    w = tl.interleave(lo, hi)  # [BLOCK_N, BLOCK_K]: even k from the low nibbles
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None])


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _dequant_linear(x, qweight, sg, zg, group, input_scale, bias):
    """Large batches: dequantize the int4 weight into a shared bf16 scratch and let cuBLAS multiply (the
    GEMM is compute-bound there, so 2.5 extra bytes per weight cost less than a slow fused kernel)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    key = (x.device, x.dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n * k:  # grows to the largest projection once (warm-up, outside graphs)
        buf = _SCRATCH[key] = torch.empty(n * k, dtype=x.dtype, device=x.device)
    w = buf[: n * k].view(n, k)
    bk = min(group, 128)
    _int4_dequant_kernel[(triton.cdiv(n, 64), k // bk)](qweight, sg, zg, w, n, qweight.stride(0), sg.stride(0),
                                                        w.stride(0), GROUP=group, BLOCK_N=64, BLOCK_K=bk,
                                                        **pdl_args(w))
    if input_scale is not None:
        x = (x.float() / input_scale).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def _split_for(tiles_k: int, programs: int) -> int:
    """Split K into whole tiles (at least 2 per split) until ``programs * split`` fills the GPU. The splits
    need not be equal (the last takes the remainder): Llama-2-7B's down projection, 86 tiles of 128, could
    only split in 2 while equal parts were required (Nsight Compute: 0.19 waves, 2.34 TB/s at one row)."""
    split = 1
    while (split * 2 <= TACTICS["small_max_split_k"] and programs * split < TACTICS["small_target_programs"]
           and tiles_k // (split * 2) >= 2 and (TACTICS["uneven_split"] or tiles_k % (split * 2) == 0)):
        split *= 2
    return split


def _reduce_splits(part, bias, out, split: int) -> None:
    m, n = out.shape
    blk = min(1024, triton.next_power_of_2(n))
    _splitk_reduce_kernel[(m, triton.cdiv(n, blk))](part, bias if bias is not None else part, out, m, n,
                                                    out.stride(0), SPLIT=split, HAS_BIAS=bias is not None,
                                                    BLOCK=blk, **pdl_args(out))


def int4_gemv_tactics(n: int, k: int) -> dict[str, int]:
    """The int4 GEMV's tiles for a ``[n, k]`` weight: the tuner's per-shape entry over the ``gemv_*`` defaults."""
    return {**{key: TACTICS[key] for key in PER_SHAPE_KEYS}, **TACTICS["per_shape"].get(gemv.shape_key(n, k), {})}


def _int4_gemv(x, qweight, sg, zg, group, input_scale, bias, out):
    m, k = x.shape
    n = qweight.shape[0]
    t = int4_gemv_tactics(n, k)
    bn = t["gemv_block_n"]
    bk = max(group, min(t["gemv_block_k"], triton.next_power_of_2(k)))
    tiles = triton.cdiv(k, bk)
    programs = m * triton.cdiv(n, bn)  # ragged splits: any count, tiles past K are masked in the kernel
    split = max(1, min(TACTICS["small_max_split_k"], TACTICS["small_target_programs"] // programs, tiles))
    per_split = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, per_split)
    words = TACTICS["gemv_words"] if qweight.stride(0) % 4 == 0 else 0
    w = qweight.view(torch.int32) if words else qweight
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    _int4_gemv_kernel[(m, triton.cdiv(n, bn), split)](
        x, input_scale if input_scale is not None else sg, w, sg, zg, bias if bias is not None else sg, out,
        part, m, n, k, per_split * bk, x.stride(0), w.stride(0), sg.stride(0), out.stride(0), GROUP=group,
        HAS_ISC=input_scale is not None, HAS_BIAS=bias is not None and split == 1, SPLIT=split, WORDS=words,
        BLOCK_N=bn, BLOCK_K=bk, STAGES=t["gemv_num_stages"], num_warps=t["gemv_num_warps"],
        num_stages=t["gemv_num_stages"], **pdl_args(x))
    if split > 1:
        _reduce_splits(part, bias, out, split)
    return out


def _scaled_mm_ok(m: int, n: int, k: int) -> bool:
    t = TACTICS["scaled_mm_min_m"]
    return (not _INTERPRET and t > 0 and m >= t and n % 16 == 0 and k % 16 == 0
            and torch.cuda.get_device_capability() >= (8, 9))


def qgemm(x: torch.Tensor | QuantizedRows, method: str, qweight: torch.Tensor, scales: torch.Tensor,
          zeros: torch.Tensor | None = None, group: int = 0, input_scale: torch.Tensor | None = None,
          bias: torch.Tensor | None = None, scales_gn: torch.Tensor | None = None,
          zeros_gn: torch.Tensor | None = None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T (+ bias)`` for a stored quantized weight (``quant_linear`` layouts).

    ``x`` may be ``QuantizedRows`` for fp8/w8a8 (quantized by the op that produced it, ``input_scale``
    already divided out). ``scales_gn`` / ``zeros_gn`` are int4's group tensors transposed to ``[K/G, N]``
    (coalesced loads); made from ``scales`` / ``zeros`` when not given."""
    w_int4 = method in ("int4", "int4-awq")
    x_quant = method in QUANTIZED_INPUT_METHODS
    pre = isinstance(x, QuantizedRows)
    if pre:
        check_quantized_input(method)
    m, k = x.q.shape if pre else x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=qweight.device)
    if m == 0:
        return out
    xs = None
    if pre:
        x, xs = x.q, x.scale
    x = x if x.stride(-1) == 1 else x.contiguous()
    # decode rows: the GEMM quantizes its own activations (fp8 only on the GPU: the interpreter's e4m3
    # rounding is wrong)
    fuse = (x_quant and not pre and m <= TACTICS["small_m"] and bool(TACTICS["fuse_act_quant"])
            and not (method == "fp8" and _INTERPRET))
    if x_quant and not fuse:
        if not pre:
            x, xs = quantize_activations(x, method, input_scale)
        if method == "fp8" and out.dtype == torch.bfloat16 and _scaled_mm_ok(m, n, k):
            y = torch._scaled_mm(x, qweight.t(), scale_a=xs[:, None], scale_b=scales[None, :].float(),
                                 bias=None, out_dtype=torch.bfloat16)
            if bias is not None:
                y = y + bias
            return y.to(out.dtype)
        if method == "w8a8" and not _INTERPRET and m >= max(TACTICS["int_mm_min_m"], 17) and k % 8 == 0 \
                and n % 8 == 0:
            y = torch._int_mm(x, qweight.t()).float() * xs[:, None] * scales[None, :].float()
            if bias is not None:
                y = y + bias.float()
            return y.to(out.dtype)
    if (not w_int4 and not fuse and (x_quant or input_scale is None) and gemv.applies(m, qweight.element_size(), n, k)
            and (method != "w8a8" or gemv.TACTICS["w8a8_gemv"])):
        return gemv.gemv(x, qweight, bias, xs, scales, out.dtype)
    if w_int4:
        if k % group or group % 16:
            raise ValueError(f"int4 GEMM needs K ({k}) a multiple of the group size ({group}) and group % 16 == 0")
        sg = scales_gn if scales_gn is not None else scales.t().contiguous()
        zg = zeros_gn if zeros_gn is not None else zeros.t().contiguous()
    else:
        sg, zg = scales, scales
    if w_int4 and 0 < TACTICS["int4_dequant_min_m"] <= m:
        return _dequant_linear(x, qweight, sg, zg, group, input_scale, bias)
    if w_int4 and m <= TACTICS["gemv_max_m"]:
        return _int4_gemv(x, qweight, sg, zg, group, input_scale, bias, out)
    small = m <= TACTICS["small_m"]
    swap = False
    if small:
        bm, bn, bk = min(64, max(16, triton.next_power_of_2(m))), TACTICS["small_block_n"], TACTICS["small_block_k"]
        warps, stages = TACTICS["small_num_warps"], TACTICS["small_num_stages"]
        swap = bool(TACTICS["small_swap"])
    else:
        bm, bn, bk = TACTICS["large_block_m"], TACTICS["large_block_n"], TACTICS["large_block_k"]
        warps, stages = TACTICS["large_num_warps"], TACTICS["large_num_stages"]
    bk = _pow2_at_most(min(bk, group) if w_int4 else bk, k)
    while k % bk and bk > 16:  # e.g. K = 576 (SmolLM2): 64-wide tiles, not a refusal
        bk //= 2
    if k % bk:
        raise ValueError(f"quantized GEMM: K={k} must be a multiple of 16")
    grid_mn = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    tiles_k = k // bk
    split = _split_for(tiles_k, grid_mn) if small else 1
    k_per_split = triton.cdiv(tiles_k, split) * bk
    split = triton.cdiv(tiles_k * bk, k_per_split)  # no empty split
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    # IEEE fp32 dots for fp32 inputs (tf32 would miss fp32 tolerances) and under the interpreter, which
    # multiplies bf16 dot operands as raw bits; else 16-bit tensor cores.
    ieee = (x.dtype == torch.float32 and not fuse) or _INTERPRET
    dummy = scales
    _qgemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split)](
        x, xs if xs is not None else dummy,
        input_scale if (input_scale is not None and (fuse or not x_quant)) else dummy,
        qweight, sg, zg, bias if bias is not None else dummy, out, part,
        m, n, k, k_per_split, x.stride(0), qweight.stride(0), sg.stride(0) if w_int4 else 0, out.stride(0),
        W_INT4=w_int4, GROUP=group if w_int4 else 1, X_QUANT=x_quant,
        HAS_ISC=input_scale is not None and (fuse or not x_quant), HAS_BIAS=bias is not None and split == 1,
        SPLIT=split, IEEE=ieee, NATIVE_DOT=x_quant and not ieee and bool(TACTICS["native_dot"]), SWAP=swap,
        FUSE_ACT=fuse, ACT_FP8=method == "fp8", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        num_stages=1 if _INTERPRET else stages, **pdl_args(x))
    if split > 1:
        _reduce_splits(part, bias, out, split)
    return out
