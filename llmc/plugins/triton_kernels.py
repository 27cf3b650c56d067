"""Triton kernels for the CUDA path of ``plugins/ops.py`` (same signatures as ``reference.py``).

Runs on the CPU too under ``TRITON_INTERPRET=1`` (tests). Every launch takes its grid from host ints
(``meta.max_seq_len``, ``meta.num_seqs``, tensor shapes, the host list ``query_start_loc_cpu``) and reads
all per-sequence data on the device, so no call syncs the host with the GPU; the decode-only path builds no
host tensors at all and can be captured in a CUDA graph.

- ``write_kv``: one program per new token scatters its K/V rows to its slot; slot -1 is masked off in the
  kernel (CUDA-graph padding), never filtered on the host. A quantized cache (fp8 e4m3 / int8, with scale
  pools: ``kv_layout.py``) is quantized here, one scale per (token, KV head), exactly as
  ``reference.quantize_kv``; the attention kernels dequantize on read by folding the K scale into the
  scores and the V scale into the probabilities, so K/V tiles go to fp16 dots unscaled (fp8 and int8 values
  are exact in fp16). The kernels read V through all four strides: 1-byte V pools are stored head_dim-major
  within each page (``kv_layout.py``), row-major pools work too.
- ``paged_attention``:
  * decode rows (one query token): flash-decoding. One program per (sequence, KV head, split) serves the
    whole query group of that KV head, so K/V is read once per group (GQA), walks its share of the context
    through the block table, and keeps an online softmax. Splitting the context keeps 132 SMs busy when a
    batch has few, long sequences; a second kernel merges the partial (max, sum, acc) of the splits.
  * sequences with more than one new token (prefill, chunked prefill, mixed batches): flash attention over
    query tiles. The grid is (an upper bound on the query tiles of all sequences, query heads); each program
    finds its sequence by binary search on ``query_start_loc`` (no host tile list), walks the keys fully
    visible to all its rows without a mask, then the diagonal tiles with a causal mask by position.
- ``rms_norm``, ``fused_add_rms_norm``, ``silu_and_mul``, ``rotary_embedding``: one program per row/token,
  fp32 math, results rounded once as in the references.

Block sizes come from ``TACTICS`` (module level) so a build-time autotuner can time variants and store
the winners; ``0`` in a ``*_num_splits`` entry means "use the heuristic".
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmc.plugins import gemv, reference
from llmc.plugins.act_quant import QuantizedRows, empty_rows
from llmc.plugins.kv_layout import KV_QMAX
from llmc.plugins.metadata import AttentionMetadata
from llmc.plugins.triton_compat import INTERPRET as _INTERPRET, pdl_args, pdl_wait, row_warps
from llmc.plugins.ops import register
from llmc.plugins.quant_gemm import act_scale, act_values, round_e4m3

_LOG2E = 1.4426950408889634

TACTICS: dict[str, int] = {
    # decode (flash-decoding)
    # H100 sweep, batch 64 x 4096 bf16: 1.43 ms = the device copy bandwidth; without tl.dot 2.1 ms
    "decode_block_n": 64,            # context tokens per inner tile
    "decode_num_warps": 4,
    "decode_num_stages": 2,          # software-pipelining depth of the K/V loads
    "decode_use_dot": 1,             # tl.dot on the (padded to 16) query group, else broadcast-multiply
    "decode_num_splits": 0,          # 0: heuristic below; >0: force
    "decode_target_programs": 528,   # ~4 programs per SM of an H100 (132 SMs)
    "decode_min_split_tokens": 128,  # never split finer than this many context tokens
    "decode_max_splits": 64,
    # 1-byte (fp8/int8) K/V caches have their own tiles: converting K/V for the dots, not DRAM, bounds them
    # and wide tiles win (H200 sweep 2026-12-01, fp8: batch 64 x 4096 1.246 -> 1.001 ms, 256 x 256 0.332 ->
    # 0.276 ms against 64/4/2), and an engine given --kv-cache-dtype at load keeps its 16-bit tuning apart
    "decode_q8_block_n": 128,
    "decode_q8_num_warps": 4,
    "decode_q8_num_stages": 2,
    # prefill / mixed (flash attention over query tiles); H100 sweep, 8 x 2048 bf16: 64/64/4/3 and
    # 128/32/4/3 tie at 0.94 ms (flash SDPA 0.91 ms), 128/64/8/3 1.04 ms; the smaller tile fills more SMs
    "prefill_block_m": 64,
    "prefill_block_n": 64,
    "prefill_num_warps": 4,
    "prefill_num_stages": 3,
    # small ops
    "small_num_warps": 4,
}




def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


_SMEM_BUDGET = 192 * 1024  # of an H100's 227 KiB per block: headroom for Triton's layout conversions


def _fit_tiles(rows: int, bn: int, stages: int, d: int, esize: int) -> tuple[int, int, int]:
    """Shrink (pipeline depth, then BLOCK_N, then the query rows) until ``stages`` K/V tiles plus the query
    tile fit in shared memory; the defaults are sized for bf16 at head_dim 128, and fp32 or head_dim 256
    would otherwise fail to compile ("out of resources")."""
    while stages * 2 * bn * d * esize + rows * d * esize > _SMEM_BUDGET:
        if stages > 2:
            stages -= 1
        elif bn > 16:
            bn //= 2
        elif rows > 16:
            rows //= 2
        else:
            break
    return rows, bn, stages


# ============================================================================ write_kv
@triton.jit
def _kv_values(y, IS_INT: tl.constexpr, ROUND_FP8: tl.constexpr):
    """Scaled K/V values as stored: int8 rounds half up, fp8 saturates at 448 (rounded first under the
    interpreter, whose fp32 -> e4m3 cast is faulty)."""
    if IS_INT:
        y = tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0)
    else:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        if ROUND_FP8:
            y = round_e4m3(y)
    return y


@triton.jit
def _quantize_rows(x, QMAX: tl.constexpr, IS_INT: tl.constexpr, ROUND_FP8: tl.constexpr):
    """``x [H, D]`` -> (values to store, per-row fp32 scales), as ``reference.quantize_kv``."""
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) / QMAX, 1e-12)  # KV_SCALE_FLOOR
    return _kv_values(x / scale[:, None], IS_INT, ROUND_FP8), scale


@triton.jit
def _quantize_halves(a, b, QMAX: tl.constexpr, IS_INT: tl.constexpr, ROUND_FP8: tl.constexpr):
    """``_quantize_rows`` of rows held as two halves ``a, b [H, D/2]`` (RoPE's layout): one scale per row."""
    amax = tl.maximum(tl.max(tl.abs(a), axis=1), tl.max(tl.abs(b), axis=1))
    scale = tl.maximum(amax / QMAX, 1e-12)  # KV_SCALE_FLOOR
    return (_kv_values(a / scale[:, None], IS_INT, ROUND_FP8), _kv_values(b / scale[:, None], IS_INT, ROUND_FP8),
            scale)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_vcd, stride_sb,
                     stride_ss, PAGE: tl.constexpr, H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr,
                     D_PAD: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                     ROUND_FP8: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // PAGE
    row = slot % PAGE
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    hmask = (offs_h < H) & (slot >= 0)
    mask = hmask[:, None] & (offs_d[None, :] < D)
    tt = t.to(tl.int64)
    k = tl.load(k_ptr + tt * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + tt * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
    kdst = kc_ptr + blk * stride_kcb + row * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vdst = vc_ptr + blk * stride_vcb + row * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd
    if QUANT:
        k, k_scale = _quantize_rows(k, QMAX, IS_INT, ROUND_FP8)
        v, v_scale = _quantize_rows(v, QMAX, IS_INT, ROUND_FP8)
        soff = blk * stride_sb + row * stride_ss + offs_h
        tl.store(ks_ptr + soff, k_scale, mask=hmask)
        tl.store(vs_ptr + soff, v_scale, mask=hmask)
    tl.store(kdst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vdst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def _last_dim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _scale_args(k_cache, k_scale, v_scale) -> tuple:
    """(k scale pool, v scale pool, block stride, row stride, QUANT, QMAX, IS_INT): what the kernels take for
    a quantized cache; dummies (never read) for a plain one."""
    if k_scale is None:
        return k_cache, k_cache, 0, 0, False, 1.0, False
    assert k_scale.shape == v_scale.shape == k_cache.shape[:3] and k_scale.stride() == v_scale.stride()
    assert k_scale.stride(2) == 1 and k_scale.dtype == v_scale.dtype == torch.float32
    return (k_scale, v_scale, k_scale.stride(0), k_scale.stride(1), True, KV_QMAX[k_cache.dtype],
            k_cache.dtype == torch.int8)


@register("write_kv")
def write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Scatter ``k, v [T, Hkv, D]`` (strided views of a fused qkv are fine) into the paged caches,
    quantizing per (token, head) when scale pools are given."""
    T, H, D = k.shape
    if T == 0:
        return
    assert k_cache.stride(3) == 1
    k, v = _last_dim_contig(k), _last_dim_contig(v)
    ks, vs, stride_sb, stride_ss, quant, qmax, is_int = _scale_args(k_cache, k_scale, v_scale)
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, ks, vs, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_cache.stride()[:4], stride_sb, stride_ss,
        PAGE=k_cache.shape[1], H=H, H_PAD=_pow2(H), D=D, D_PAD=_pow2(D),
        QUANT=quant, QMAX=qmax, IS_INT=is_int, ROUND_FP8=_INTERPRET and quant and not is_int,
        num_warps=TACTICS["small_num_warps"], **pdl_args(k))


# ============================================================================ decode attention
@triton.jit
def _fold_v_scales(p, v_sc, P_NORM: tl.constexpr):
    """``(p * s, s_top)`` for a quantized V with per-token scales ``s``: sum_n p_n (v_n s_n) = sum_n (p_n s_n) v_n.
    With ``P_NORM`` (fp16 dots) the scales enter relative to the tile's largest ``s_top``, by which the
    caller multiplies the tile's pv, so the probabilities keep flash attention's [0, 1] range (fp16 flushes
    p * s to zero for small V); else ``s_top`` is 1."""
    if P_NORM:
        top = tl.maximum(tl.max(v_sc, axis=0), 1e-30)
        p = p * (v_sc * (1.0 / top))[None, :]
    else:
        top = 1.0
        p = p * v_sc[None, :]
    return p, top


@triton.jit
def _dot_operand(q, kc_ptr, IEEE: tl.constexpr, QUANT: tl.constexpr):
    """Queries as the dots take them: fp32 (IEEE), the cache's dtype, or fp16 for a 1-byte cache, whose K/V
    convert to fp16 in one instruction (bf16 takes two) and exactly (|e4m3| <= 448, int8); queries beyond
    fp16's range saturate at +-65504 instead of overflowing."""
    if IEEE:
        q = q.to(tl.float32)
    elif QUANT:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    else:
        q = q.to(kc_ptr.dtype.element_ty)
    return q


@triton.jit
def _v_tile(vc_ptr, bt_row, n0, end, blk, offs_n, kvh, stride_vb, stride_vs, stride_vh, stride_vd,
            D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, V_DMAJOR: tl.constexpr,
            MASKED: tl.constexpr):
    """V rows ``n0 .. n0 + BLOCK_N`` as a ``[BLOCK_N, D]`` tile (``blk``: each row's cache block). Head_dim-major
    pages (``V_DMAJOR``, 1-byte caches) are read as runs of ``SUB`` consecutive tokens, one run per page (or
    per tile within a page), so each load is a contiguous vector: per-row block numbers hide that rows
    of a page are adjacent. Masked at run granularity (a vector needs one mask): rows past ``end`` inside
    the last run read the page's other rows, which written pages hold as finite values (the KV writes clamp,
    the pools start zeroed), and their probability is 0."""
    offs_d = tl.arange(0, D)
    if V_DMAJOR:
        SUB: tl.constexpr = PAGE if PAGE < BLOCK_N else BLOCK_N
        NR: tl.constexpr = BLOCK_N // SUB
        run0 = n0 + tl.arange(0, NR) * SUB
        if MASKED:
            rmask = run0 < end
            rblk = tl.load(bt_row + run0 // PAGE, mask=rmask, other=0).to(tl.int64)
        else:
            rblk = tl.load(bt_row + run0 // PAGE).to(tl.int64)
        base = rblk * stride_vb + kvh * stride_vh + run0 % PAGE
        addr = base[:, None, None] + offs_d[None, :, None] * stride_vd + tl.arange(0, SUB)[None, None, :]
        if MASKED:
            v = tl.load(vc_ptr + addr, mask=rmask[:, None, None], other=0.0)
        else:
            v = tl.load(vc_ptr + addr)
        v = tl.reshape(tl.permute(v, (0, 2, 1)), (BLOCK_N, D))
    else:
        voff = blk * stride_vb + (offs_n % PAGE) * stride_vs + kvh * stride_vh
        if MASKED:
            v = tl.load(vc_ptr + voff[:, None] + offs_d[None, :] * stride_vd, mask=(offs_n < end)[:, None],
                        other=0.0)
        else:
            v = tl.load(vc_ptr + voff[:, None] + offs_d[None, :] * stride_vd)
    return v


def _v_dmajor(v_cache: torch.Tensor) -> bool:
    """Whether a V pool is stored head_dim-major within each page (``kv_layout.allocate_kv_cache`` does so
    for 1-byte caches): the kernels then read it as token runs (``_v_tile``)."""
    return v_cache.stride(1) == 1 and v_cache.shape[1] > 1  # rows of a page adjacent: _v_tile's runs


# Triton specializes integer arguments equal to 1 or divisible by 16; arguments that change from step to step
# (counts, the block-table width) are exempt, or a new value would stall a running server on a JIT compile.
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, ws_m_ptr, ws_l_ptr, ws_acc_ptr,
                   bt_ptr, seqlen_ptr, qsl_ptr, ks_ptr, vs_ptr, qk_scale, num_splits,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
                   stride_sb, stride_ss,
                   NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DECODE_ONLY: tl.constexpr,
                   SPLIT: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
                   V_DMAJOR: tl.constexpr, PDL: tl.constexpr):
    """One (sequence, KV head, split): the query group of that KV head against one slice of the context.
    Scores live in the log2 domain (``qk_scale`` includes log2(e)) so the softmax uses exp2. ``QUANT``:
    K/V are fp8/int8 with per-(token, head) scales at ``ks_ptr``/``vs_ptr``; the dots run in fp16
    (``_dot_operand``), the V scales folded into the probabilities (``_fold_v_scales``)."""
    pdl_wait(PDL)
    P_NORM: tl.constexpr = QUANT and not IEEE  # fp16 dots
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE_ONLY:
        row = s
        valid = True
    else:  # mixed batch: only sequences with exactly one new token are ours
        row = tl.load(qsl_ptr + s)
        valid = (tl.load(qsl_ptr + s + 1) - row) == 1
    seq_len = tl.load(seqlen_ptr + s)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    end = tl.where(valid, end, start)  # not ours: empty loop, masked stores

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None], other=0.0)
    q = _dot_operand(q, kc_ptr, IEEE, QUANT)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        blk = tl.load(bt_row + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
        koff = blk * stride_kb + (offs_n % PAGE) * stride_ks + kvh * stride_kh
        k = tl.load(kc_ptr + koff[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
        v = _v_tile(vc_ptr, bt_row, n0, end, blk, offs_n, kvh, stride_vb, stride_vs, stride_vh, stride_vd, D, PAGE,
                    BLOCK_N, V_DMAJOR, True)
        if IEEE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        elif QUANT:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if QUANT:
            soff = blk * stride_sb + (offs_n % PAGE) * stride_ss + kvh
            k_sc = tl.load(ks_ptr + soff, mask=nmask, other=0.0)
            v_sc = tl.load(vs_ptr + soff, mask=nmask, other=0.0)
        if USE_DOT:
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
        else:
            qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        if QUANT:
            qk = qk * k_sc[None, :]
        qk = tl.where(nmask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: every tile has >= 1 visible key
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if QUANT:
            p, v_top = _fold_v_scales(p, v_sc, P_NORM)
        if USE_DOT:
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        if P_NORM:
            pv = pv * v_top
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    smask = gmask & valid
    if SPLIT:
        ws = (s * NUM_Q_HEADS + heads).to(tl.int64) * num_splits + split
        tl.store(ws_m_ptr + ws, m_i, mask=smask)
        tl.store(ws_l_ptr + ws, l_i, mask=smask)
        tl.store(ws_acc_ptr + ws[:, None] * D + offs_d[None, :], acc, mask=smask[:, None])
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=smask[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(ws_m_ptr, ws_l_ptr, ws_acc_ptr, out_ptr, qsl_ptr, num_splits, stride_ot, stride_oh,
                         NUM_Q_HEADS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr,
                         DECODE_ONLY: tl.constexpr, PDL: tl.constexpr):
    """Combine the splits of one (sequence, query head): rescale each partial by exp2(m_split - m_max)."""
    pdl_wait(PDL)
    s = tl.program_id(0)
    h = tl.program_id(1)
    if DECODE_ONLY:
        row = s
        valid = True
    else:
        row = tl.load(qsl_ptr + s)
        valid = (tl.load(qsl_ptr + s + 1) - row) == 1
    offs = tl.arange(0, SPLITS_PAD)
    smask = (offs < num_splits) & valid
    base = (s * NUM_Q_HEADS + h).to(tl.int64) * num_splits
    m = tl.load(ws_m_ptr + base + offs, mask=smask, other=float("-inf"))
    l = tl.load(ws_l_ptr + base + offs, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no split saw a key (not ours): avoid inf - inf
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)  # empty splits (m = -inf) weigh nothing
    offs_d = tl.arange(0, D)
    acc = tl.load(ws_acc_ptr + (base + offs)[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    denom = tl.sum(l * w, axis=0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + row.to(tl.int64) * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=(offs_d < D) & valid)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Splits per sequence: enough (sequence, KV head, split) programs to fill the GPU
    (``decode_target_programs``), but no split shorter than ``decode_min_split_tokens``."""
    if TACTICS["decode_num_splits"] > 0:
        return TACTICS["decode_num_splits"]
    want = -(-TACTICS["decode_target_programs"] // max(num_seqs * num_kv_heads, 1))
    cap = max(1, max_seq_len // TACTICS["decode_min_split_tokens"])
    return max(1, min(want, cap, TACTICS["decode_max_splits"]))


def _splits_pad(nsplit: int) -> int:
    """Merge width: one compiled variant for every split count up to ``decode_max_splits`` (the count
    changes with batch size and context length from step to step)."""
    return _pow2(max(nsplit, TACTICS["decode_max_splits"]))


def _search_steps(num_seqs: int) -> int:
    """Binary-search depth of the prefill kernel: fixed up to 4,096 sequences, so batches of different
    sizes share one compiled variant."""
    return max(12, math.ceil(math.log2(max(num_seqs, 2))))


def _compute_mode(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """IEEE fp32 dots when either side is fp32 (tf32 would miss fp32 tolerances), else 16-bit tensor cores
    in the cache's dtype. The Triton 3.6 interpreter multiplies bf16 dot operands as raw bits, so under it
    bf16 takes the fp32 path too (the 16-bit dots are exercised on the GPU only)."""
    if _INTERPRET and torch.bfloat16 in (q.dtype, cache.dtype):
        return True
    return q.dtype == torch.float32 or cache.dtype == torch.float32


def _tile_esize(q: torch.Tensor, k_cache: torch.Tensor, ieee: bool) -> int:
    """Bytes per element of the K/V tiles the dots read (a quantized cache is converted to fp16)."""
    if ieee:
        return 4
    return 2 if k_cache.element_size() == 1 else k_cache.element_size()


def decode_tiles(group: int, head_dim: int, quant: bool, esize: int) -> tuple[int, int, int, int]:
    """(query rows padded, BLOCK_N, warps, stages) of a decode launch from ``TACTICS`` (1-byte caches have
    their own ``decode_q8_*`` tiles), fitted to shared memory; ``esize``: bytes per element of the dots' tiles."""
    gpad = max(16, _pow2(group)) if TACTICS["decode_use_dot"] else _pow2(group)
    tiles = "decode_q8_" if quant else "decode_"
    _, block_n, stages = _fit_tiles(gpad, TACTICS[tiles + "block_n"], TACTICS[tiles + "num_stages"], head_dim,
                                    esize)
    return gpad, block_n, TACTICS[tiles + "num_warps"], stages


def paged_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor,
                 decode_only: bool = True, num_splits: int | None = None, k_scale=None, v_scale=None) -> None:
    """Write ``out`` for every sequence with one new token (all of them when ``decode_only``)."""
    S = meta.num_seqs
    Hq, D = q.shape[1], q.shape[2]
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    group = Hq // Hkv
    nsplit = num_splits or decode_num_splits(S, Hkv, meta.max_seq_len)
    use_dot = bool(TACTICS["decode_use_dot"])
    ks, vs, stride_sb, stride_ss, quant, _, _ = _scale_args(k_cache, k_scale, v_scale)
    ieee = _compute_mode(q, k_cache)
    gpad, block_n, warps, stages = decode_tiles(group, D, quant, _tile_esize(q, k_cache, ieee))
    if nsplit > 1:
        ws_m = torch.empty((S, Hq, nsplit), dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty((S, Hq, nsplit, D), dtype=torch.float32, device=q.device)
    else:
        ws_m = ws_l = ws_acc = out  # unused
    _decode_kernel[(S, Hkv, nsplit)](
        q, k_cache, v_cache, out, ws_m, ws_l, ws_acc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        ks, vs, scale * _LOG2E, nsplit, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_cache.stride()[:4],
        meta.block_tables.stride(0), stride_sb, stride_ss, NUM_Q_HEADS=Hq, GROUP=group, GROUP_PAD=gpad, D=D,
        PAGE=page, BLOCK_N=block_n, DECODE_ONLY=decode_only, SPLIT=nsplit > 1, USE_DOT=use_dot, IEEE=ieee,
        QUANT=quant, V_DMAJOR=_v_dmajor(v_cache), num_warps=warps, num_stages=stages, **pdl_args(q))
    if nsplit > 1:
        _decode_merge_kernel[(S, Hq)](
            ws_m, ws_l, ws_acc, out, meta.query_start_loc, nsplit, out.stride(0), out.stride(1),
            NUM_Q_HEADS=Hq, SPLITS_PAD=_splits_pad(nsplit), D=D, DECODE_ONLY=decode_only, num_warps=4, **pdl_args(q))


# ============================================================================ prefill / mixed attention
@triton.jit
def _prefill_tile(n0, q, m_i, l_i, acc, pos_q, seq_len, kc_ptr, vc_ptr, bt_row, kvh, qk_scale, ks_ptr, vs_ptr,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_sb, stride_ss,
                  D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  IEEE: tl.constexpr, QUANT: tl.constexpr, V_DMAJOR: tl.constexpr):
    """Fold keys ``n0 .. n0 + BLOCK_N`` (gathered through the block table) into the online softmax.
    Unmasked tiles lie entirely below every row's position, so they skip both the bounds and causal mask.
    ``QUANT``: dequantize as in ``_decode_kernel`` (K scale on the scores, V scale on the probabilities:
    ``_fold_v_scales``)."""
    P_NORM: tl.constexpr = QUANT and not IEEE  # fp16 dots
    offs_d = tl.arange(0, D)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        nmask = offs_n < seq_len
        blk = tl.load(bt_row + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs_n // PAGE).to(tl.int64)
    koff = blk * stride_kb + (offs_n % PAGE) * stride_ks + kvh * stride_kh
    if MASKED:
        k = tl.load(kc_ptr + koff[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
    else:
        k = tl.load(kc_ptr + koff[:, None] + offs_d[None, :])
    v = _v_tile(vc_ptr, bt_row, n0, seq_len, blk, offs_n, kvh, stride_vb, stride_vs, stride_vh, stride_vd, D, PAGE,
                BLOCK_N, V_DMAJOR, MASKED)
    if QUANT:
        soff = blk * stride_sb + (offs_n % PAGE) * stride_ss + kvh
        if MASKED:
            k_sc = tl.load(ks_ptr + soff, mask=nmask, other=0.0)
            v_sc = tl.load(vs_ptr + soff, mask=nmask, other=0.0)
        else:
            k_sc = tl.load(ks_ptr + soff)
            v_sc = tl.load(vs_ptr + soff)
        if not IEEE:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
    if IEEE:
        qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if QUANT:
        qk = qk * (k_sc * qk_scale)[None, :]
    else:
        qk = qk * qk_scale
    if MASKED:
        ok = (offs_n[None, :] <= pos_q[:, None]) & nmask[None, :]
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_use = m_new
    p = tl.exp2(qk - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if QUANT:
        p, v_top = _fold_v_scales(p, v_sc, P_NORM)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    if P_NORM:
        pv = pv * v_top
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit(do_not_specialize=["num_seqs", "num_tiles", "stride_bt"])  # vary per step: no recompiles
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, bt_ptr, seqlen_ptr, qsl_ptr, ks_ptr, vs_ptr, qk_scale,
                    num_seqs, num_tiles, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
                    stride_sb, stride_ss,
                    GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr, SKIP_DECODE: tl.constexpr,
                    IEEE: tl.constexpr, QUANT: tl.constexpr, V_DMAJOR: tl.constexpr, PDL: tl.constexpr):
    """BLOCK_M query rows of one sequence x one query head, over that sequence's paged context.

    Sequence ``s`` owns tiles ``qsl[s] // BLOCK_M + s ...`` (at least ceil(q_len / BLOCK_M) of them, the
    surplus exits), so ``num_tiles = T // BLOCK_M + S`` bounds the grid from host ints. Tiles run in
    reverse so each sequence's heaviest (last) tiles start first."""
    pdl_wait(PDL)
    tile = num_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    lo = tl.program_id(0) * 0  # int32 scalar; binary search for the last s with start(s) <= tile
    hi = lo + num_seqs
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        take = tl.load(qsl_ptr + mid) // BLOCK_M + mid <= tile
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    s = lo
    q0 = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q0
    m0 = (tile - (q0 // BLOCK_M + s)) * BLOCK_M
    valid = m0 < q_len
    if SKIP_DECODE:  # one-token rows of a mixed batch went to the decode kernel
        valid = valid & (q_len > 1)
    seq_len = tl.load(seqlen_ptr + s)
    ctx0 = seq_len - q_len  # cached prefix length
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = (rows < q_len) & valid
    pos_q = ctx0 + rows
    offs_d = tl.arange(0, D)
    kvh = h // GROUP
    q = tl.load(q_ptr + (q0 + rows).to(tl.int64)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    q = _dot_operand(q, kc_ptr, IEEE, QUANT)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    # keys [0, full_end) are visible to every row of the tile; [full_end, diag_end) need the causal mask
    full_end = ((ctx0 + m0 + 1) // BLOCK_N) * BLOCK_N
    diag_end = tl.minimum(seq_len, ctx0 + m0 + BLOCK_M)
    full_end = tl.where(valid, full_end, 0)
    diag_end = tl.where(valid, diag_end, 0)
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(n0, q, m_i, l_i, acc, pos_q, seq_len, kc_ptr, vc_ptr, bt_row, kvh, qk_scale,
                                      ks_ptr, vs_ptr, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                      stride_vh, stride_vd, stride_sb, stride_ss, D, PAGE, BLOCK_N, False, IEEE, QUANT,
                                      V_DMAJOR)
    for n0 in range(full_end, diag_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(n0, q, m_i, l_i, acc, pos_q, seq_len, kc_ptr, vc_ptr, bt_row, kvh, qk_scale,
                                      ks_ptr, vs_ptr, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                      stride_vh, stride_vd, stride_sb, stride_ss, D, PAGE, BLOCK_N, True, IEEE, QUANT,
                                      V_DMAJOR)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q0 + rows).to(tl.int64)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def paged_prefill(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor,
                  skip_decode: bool, k_scale=None, v_scale=None) -> None:
    """Write ``out`` for every sequence with more than one new token (and, unless ``skip_decode``, the
    one-token ones too)."""
    T, Hq, D = q.shape
    S = meta.num_seqs
    ieee = _compute_mode(q, k_cache)
    bm, bn, stages = _fit_tiles(TACTICS["prefill_block_m"], TACTICS["prefill_block_n"],
                                TACTICS["prefill_num_stages"], D, _tile_esize(q, k_cache, ieee))
    ks, vs, stride_sb, stride_ss, quant, _, _ = _scale_args(k_cache, k_scale, v_scale)
    num_tiles = T // bm + S
    _prefill_kernel[(num_tiles, Hq)](
        q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, ks, vs, scale * _LOG2E,
        S, num_tiles, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_cache.stride()[:4],
        meta.block_tables.stride(0), stride_sb, stride_ss, GROUP=Hq // k_cache.shape[2], D=D, PAGE=k_cache.shape[1],
        BLOCK_M=bm, BLOCK_N=bn, SEARCH_STEPS=_search_steps(S), SKIP_DECODE=skip_decode, IEEE=ieee, QUANT=quant,
        V_DMAJOR=_v_dmajor(v_cache), num_warps=TACTICS["prefill_num_warps"], num_stages=stages, **pdl_args(q))


@register("paged_attention")
def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                    v_scale=None) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` over each sequence's paged context (see ``reference.py``);
    with ``k_scale``/``v_scale``, the cache is quantized (fp8/int8) and dequantized on read."""
    T, Hq, D = q.shape
    assert D & (D - 1) == 0 and 16 <= D <= 256, "head_dim must be a power of two in 16..256"
    assert Hq % k_cache.shape[2] == 0 and k_cache.stride(3) == 1  # V: any strides (kv_layout.py)
    q = _last_dim_contig(q)
    out = torch.empty_like(q)
    if T == 0 or meta.num_seqs == 0:
        return out
    if meta.max_query_len == 1:
        paged_decode(q, k_cache, v_cache, meta, scale, out, decode_only=True, k_scale=k_scale, v_scale=v_scale)
        return out
    qsl = meta.query_start_loc_cpu
    has_decode = any(qsl[i + 1] - qsl[i] == 1 for i in range(meta.num_seqs))
    if has_decode:  # one-token rows: flash-decoding (GQA-shared K/V reads) instead of a 1-row tile
        paged_decode(q, k_cache, v_cache, meta, scale, out, decode_only=False, k_scale=k_scale, v_scale=v_scale)
    paged_prefill(q, k_cache, v_cache, meta, scale, out, skip_decode=has_decode, k_scale=k_scale, v_scale=v_scale)
    return out


# ============================================================================ fused small ops
@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, isc_ptr, s_ptr, eps, stride_x, stride_r,
                     N: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, QUANT: tl.constexpr,
                     IS_FP8: tl.constexpr, HAS_ISC: tl.constexpr, ROUND_FP8: tl.constexpr, PDL: tl.constexpr):
    """``QUANT``: store the row quantized per token for an fp8/w8a8 linear (``out`` is 8-bit, ``s`` gets its
    scale), from the normalized row rounded to the input dtype, exactly what that linear would quantize."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)  # the reference normalises the rounded sum
        tl.store(res_out_ptr + row * N + offs, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(var + eps) * w
    if QUANT:
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        if HAS_ISC:
            y = y / tl.load(isc_ptr + offs, mask=mask, other=1.0)
        scale = act_scale(tl.max(tl.abs(y), axis=0), IS_FP8)
        tl.store(s_ptr + row, scale)
        tl.store(out_ptr + row * N + offs, act_values(y / scale, out_ptr.dtype.element_ty, IS_FP8, ROUND_FP8),
                 mask=mask)
    else:
        tl.store(out_ptr + row * N + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _quant_out(rows: int, n: int, method: str | None, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(8-bit rows, fp32 scales) for a producer that quantizes for a ``method`` linear; (None, None) if not."""
    return (None, None) if method is None else empty_rows(rows, n, method, device)


def _quant_flags(method: str | None, input_scale) -> dict:
    fp8 = method == "fp8"
    return dict(IS_FP8=fp8, HAS_ISC=input_scale is not None, ROUND_FP8=_INTERPRET and fp8)


def _rms(x, residual, weight, eps, method=None, input_scale=None):
    N = x.shape[-1]
    x2 = _last_dim_contig(x.reshape(-1, N))
    rows = x2.shape[0]
    q, s = _quant_out(rows, N, method, x.device)
    out = q if q is not None else torch.empty((rows, N), dtype=x.dtype, device=x.device)
    res_out = torch.empty((rows, N), dtype=x.dtype, device=x.device) if residual is not None else out
    r2 = _last_dim_contig(residual.reshape(-1, N)) if residual is not None else x2
    if rows:
        block = _pow2(N)
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, res_out,
                                  input_scale if input_scale is not None else weight, s if s is not None else weight,
                                  eps, x2.stride(0), r2.stride(0), N=N, BLOCK=block, HAS_RES=residual is not None,
                                  QUANT=method is not None, **_quant_flags(method, input_scale),
                                  num_warps=row_warps(block), **pdl_args(x2))
    normed = QuantizedRows(q, s, x.dtype) if q is not None else out.view(x.shape)
    return normed, res_out.view(x.shape)


@register("linear_fuses")
def linear_fuses(x, weight) -> bool:
    """Decode rows stream the weight through ``gemv.py``; more rows go to cuBLAS."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return gemv.applies(rows, weight.element_size(), weight.shape[0], weight.shape[1])


@register("linear")
def linear(x, weight, bias=None, norm_eps: float | None = None, residual=None, swiglu: bool = False) -> torch.Tensor:
    """The GEMV where ``linear_fuses`` (norm, residual and SwiGLU fused into it), else cuBLAS (and separate ops)."""
    if not linear_fuses(x, weight):
        if swiglu:
            return silu_and_mul(reference.linear(x, weight, bias, norm_eps, residual))
        return reference.linear(x, weight, bias, norm_eps, residual)
    rows = x.numel() // x.shape[-1]
    res = None if residual is None else residual.reshape(rows, weight.shape[0])
    y = gemv.gemv(x.reshape(rows, x.shape[-1]), weight, bias, norm_eps=norm_eps, residual=res, swiglu=swiglu)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@register("rms_norm")
def rms_norm(x, weight, eps: float) -> torch.Tensor:
    return _rms(x, None, weight, eps)[0]


@register("fused_add_rms_norm")
def fused_add_rms_norm(x, residual, weight, eps: float):
    """Returns ``(rms_norm(x + residual), x + residual)`` as new tensors (one read of each input)."""
    return _rms(x, residual, weight, eps)


@register("rms_norm_quant")
def rms_norm_quant(x, weight, eps: float, method: str, input_scale=None) -> QuantizedRows:
    """``rms_norm`` whose output row is quantized per token for a ``method`` (fp8/w8a8) linear."""
    return _rms(x, None, weight, eps, method, input_scale)[0]


@register("fused_add_rms_norm_quant")
def fused_add_rms_norm_quant(x, residual, weight, eps: float, method: str, input_scale=None):
    """``(quantized rms_norm(x + residual), x + residual)``, the quantization as ``rms_norm_quant``."""
    return _rms(x, residual, weight, eps, method, input_scale)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, I: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * I + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@register("silu_and_mul")
def silu_and_mul(x) -> torch.Tensor:
    """SwiGLU on ``[..., 2 * I]`` (gate first)."""
    I = x.shape[-1] // 2
    x2 = _last_dim_contig(x.reshape(-1, 2 * I))
    out = torch.empty((x2.shape[0], I), dtype=x.dtype, device=x.device)
    block = min(1024, _pow2(I))
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(I, block))](x2, out, x2.stride(0), I=I, BLOCK=block,
                                                               num_warps=TACTICS["small_num_warps"], **pdl_args(x2))
    return out.view(*x.shape[:-1], I)


@triton.jit
def _silu_mul_rounded(x_ptr, isc_ptr, row, stride_x, offs, mask, I: tl.constexpr, HAS_ISC: tl.constexpr):
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_ISC:
        y = y / tl.load(isc_ptr + offs, mask=mask, other=1.0)
    return y


@triton.jit
def _silu_mul_quant_kernel(x_ptr, isc_ptr, q_ptr, s_ptr, stride_x, I: tl.constexpr, BLOCK: tl.constexpr,
                           IS_FP8: tl.constexpr, HAS_ISC: tl.constexpr, ROUND_FP8: tl.constexpr, PDL: tl.constexpr):
    """One row: SwiGLU rounded to the input dtype, its absmax, then the quantized row. ``BLOCK >= I``: the
    row stays in registers (one pass); else the SwiGLU is recomputed in a second pass (inputs in L2)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    if BLOCK >= I:
        offs = tl.arange(0, BLOCK)
        y = _silu_mul_rounded(x_ptr, isc_ptr, row, stride_x, offs, offs < I, I, HAS_ISC)
        scale = act_scale(tl.max(tl.abs(y), axis=0), IS_FP8)
        tl.store(s_ptr + row, scale)
        tl.store(q_ptr + row * I + offs, act_values(y / scale, q_ptr.dtype.element_ty, IS_FP8, ROUND_FP8),
                 mask=offs < I)
        return
    amax = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, I, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        y = _silu_mul_rounded(x_ptr, isc_ptr, row, stride_x, offs, offs < I, I, HAS_ISC)
        amax = tl.maximum(amax, tl.abs(y))
    scale = act_scale(tl.max(amax, axis=0), IS_FP8)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, I, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        y = _silu_mul_rounded(x_ptr, isc_ptr, row, stride_x, offs, offs < I, I, HAS_ISC)
        tl.store(q_ptr + row * I + offs, act_values(y / scale, q_ptr.dtype.element_ty, IS_FP8, ROUND_FP8),
                 mask=offs < I)


@register("silu_and_mul_quant")
def silu_and_mul_quant(x, method: str, input_scale=None) -> QuantizedRows:
    """``silu_and_mul`` of ``[T, 2 * I]`` quantized per token for a ``method`` (fp8/w8a8) linear."""
    I = x.shape[-1] // 2
    x2 = _last_dim_contig(x.reshape(-1, 2 * I))
    q, s = _quant_out(x2.shape[0], I, method, x.device)
    # a decode row is one program: the whole row in registers (32 values per thread at 16 warps) beats
    # looping twice over it (H200, Llama-2-7B's 11,008: 10 us a row with 2,048-wide blocks)
    block = _pow2(I) if _pow2(I) <= 16384 else 4096
    if x2.shape[0]:
        _silu_mul_quant_kernel[(x2.shape[0],)](x2, input_scale if input_scale is not None else s, q, s, x2.stride(0),
                                               I=I, BLOCK=block, **_quant_flags(method, input_scale),
                                               num_warps=row_warps(block),
                                               **pdl_args(x2))
    return QuantizedRows(q, s, x.dtype)


@triton.jit
def _rope_heads(x_ptr, o_ptr, t, cos, sin, stride_xt, stride_xh, H: tl.constexpr, H_PAD: tl.constexpr,
                HALF: tl.constexpr):
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF)
    hmask = offs_h[:, None] < H
    src = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=hmask, other=0.0).to(tl.float32)
    dst = o_ptr + t * (H * 2 * HALF) + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    ty = o_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(ty), mask=hmask)
    tl.store(dst + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(ty), mask=hmask)


@triton.jit
def _cos_sin(pos_ptr, cs_ptr, t, stride_cs, HALF: tl.constexpr):
    """Token ``t``'s cos and sin rows (fp32, ``HALF`` each) from the ``[max_pos, 2 * HALF]`` cache."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    cos = tl.load(cs_ptr + pos * stride_cs + offs_d).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d).to(tl.float32)
    return cos, sin


@triton.jit
def _rope_kernel(pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, cs_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                 stride_cs, HQ: tl.constexpr, HQ_PAD: tl.constexpr, HK: tl.constexpr, HK_PAD: tl.constexpr,
                 HALF: tl.constexpr, PDL: tl.constexpr):
    """One token: rotate all its query and key heads with one read of its cos/sin row."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, cs_ptr, t, stride_cs, HALF)
    _rope_heads(q_ptr, qo_ptr, t, cos, sin, stride_qt, stride_qh, HQ, HQ_PAD, HALF)
    _rope_heads(k_ptr, ko_ptr, t, cos, sin, stride_kt, stride_kh, HK, HK_PAD, HALF)


@register("rotary_embedding")
def rotary_embedding(positions, q, k, cos_sin_cache):
    """Neox (rotate-half) RoPE; returns new contiguous ``(q, k)`` (inputs may be strided views of qkv)."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    assert cos_sin_cache.shape[-1] == D and D % 2 == 0 and (D // 2) & (D // 2 - 1) == 0
    q, k = _last_dim_contig(q), _last_dim_contig(k)
    cs = _last_dim_contig(cos_sin_cache)
    qo = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((T, Hk, D), dtype=k.dtype, device=k.device)
    if T:
        _rope_kernel[(T,)](positions, q, k, qo, ko, cs, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           cs.stride(0), HQ=Hq, HQ_PAD=_pow2(Hq), HK=Hk, HK_PAD=_pow2(Hk), HALF=D // 2,
                           num_warps=TACTICS["small_num_warps"], **pdl_args(q))
    return qo, ko


@triton.jit
def _rope_write_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr, cs_ptr,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                          stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_vcd,
                          stride_sb, stride_ss, HQ: tl.constexpr, HQ_PAD: tl.constexpr, HK: tl.constexpr,
                          HK_PAD: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr,
                          QMAX: tl.constexpr, IS_INT: tl.constexpr, ROUND_FP8: tl.constexpr, PDL: tl.constexpr):
    """One token: rotate its query heads (stored to ``qo``), rotate its key heads and write them with its
    value heads straight into their cache slot (quantized per (token, head) for an fp8/int8 cache). The
    rotated key is rounded to the activation dtype first, as ``rotary_embedding`` then ``write_kv`` do."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, cs_ptr, t, stride_cs, HALF)
    _rope_heads(q_ptr, qo_ptr, t, cos, sin, stride_qt, stride_qh, HQ, HQ_PAD, HALF)

    offs_d = tl.arange(0, HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk, row = slot // PAGE, slot % PAGE
    offs_h = tl.arange(0, HK_PAD)
    hmask = (offs_h < HK) & (slot >= 0)
    mask = hmask[:, None]
    ksrc = k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    k1 = tl.load(ksrc, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(ksrc + HALF, mask=mask, other=0.0).to(tl.float32)
    act = k_ptr.dtype.element_ty
    r1 = (k1 * cos[None, :] - k2 * sin[None, :]).to(act).to(tl.float32)
    r2 = (k2 * cos[None, :] + k1 * sin[None, :]).to(act).to(tl.float32)
    vsrc = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    v1 = tl.load(vsrc, mask=mask, other=0.0).to(tl.float32)
    v2 = tl.load(vsrc + HALF, mask=mask, other=0.0).to(tl.float32)
    kdst = kc_ptr + blk * stride_kcb + row * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vdst = vc_ptr + blk * stride_vcb + row * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd
    if QUANT:
        soff = blk * stride_sb + row * stride_ss + offs_h
        r1, r2, k_scale = _quantize_halves(r1, r2, QMAX, IS_INT, ROUND_FP8)
        v1, v2, v_scale = _quantize_halves(v1, v2, QMAX, IS_INT, ROUND_FP8)
        tl.store(ks_ptr + soff, k_scale, mask=hmask)
        tl.store(vs_ptr + soff, v_scale, mask=hmask)
    cty = kc_ptr.dtype.element_ty
    tl.store(kdst, r1.to(cty), mask=mask)
    tl.store(kdst + HALF, r2.to(cty), mask=mask)
    tl.store(vdst, v1.to(cty), mask=mask)
    tl.store(vdst + HALF * stride_vcd, v2.to(cty), mask=mask)


@register("rope_write_kv")
def rope_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale=None,
                  v_scale=None) -> torch.Tensor:
    """``rotary_embedding`` then ``write_kv`` in one launch: returns the rotated ``q`` (new, contiguous);
    the rotated ``k`` and ``v`` go only to the cache. Inputs may be strided views of a fused qkv."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    assert cos_sin_cache.shape[-1] == D and D % 2 == 0 and (D // 2) & (D // 2 - 1) == 0
    assert k_cache.stride(3) == 1  # V: any strides (kv_layout.py)
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    cs = _last_dim_contig(cos_sin_cache)
    qo = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return qo
    ks, vs, stride_sb, stride_ss, quant, qmax, is_int = _scale_args(k_cache, k_scale, v_scale)
    _rope_write_kv_kernel[(T,)](
        positions, q, k, v, qo, k_cache, v_cache, slot_mapping, ks, vs, cs, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), cs.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), *v_cache.stride()[:4], stride_sb, stride_ss, HQ=Hq, HQ_PAD=_pow2(Hq), HK=Hk,
        HK_PAD=_pow2(Hk), HALF=D // 2, PAGE=k_cache.shape[1], QUANT=quant, QMAX=qmax, IS_INT=is_int,
        ROUND_FP8=_INTERPRET and quant and not is_int, num_warps=TACTICS["small_num_warps"], **pdl_args(q))
    return qo
