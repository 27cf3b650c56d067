"""Triton kernels for CUDA (also runnable on the CPU under ``TRITON_INTERPRET=1`` for tests).

- ``write_kv``: scatter new K/V rows into their cache slots; slot -1 (CUDA-graph padding) is skipped
  without any host-side masking, so it is graph-safe.
- ``paged_attention``: decode rows (one query token) go to a flash-decoding kernel: one program per
  (sequence, KV head, split) serves the whole query group of that KV head (GQA: K/V read once per group),
  walks its slice of the context through the block table in tiles of ``BLOCK_N`` tokens with an online
  softmax, and a second kernel merges the splits. Splitting the context keeps the GPU full when a batch
  has few, long sequences. Grid sizes depend only on host ints (batch size, ``max_seq_len``), so the
  decode path can be captured in a CUDA graph. Rows of sequences that prefill more than one token go to a
  flash-attention-style varlen kernel: one program per (tile of 64 query rows, query head) walks the paged
  context with ``tl.dot`` tiles and a causal mask by position (cached prefixes and chunked prefill included).

Tunables live in ``TACTICS`` so ``llmc build --device cuda`` can time variants and store the winners.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llmc.plugins.metadata import AttentionMetadata
from llmc.plugins.ops import register

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TACTICS: dict[str, int] = {"decode_block_n": 64, "decode_num_warps": 4, "decode_target_programs": 264,
                           "decode_min_tokens_per_split": 256, "prefill_block_m": 64, "prefill_block_n": 64}


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_vt,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(k_ptr + t * stride_kt + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs, mask=mask)
        tl.store(kc_ptr + slot * ROW + offs, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + slot * ROW + offs, v.to(vc_ptr.dtype.element_ty), mask=mask)


@register("write_kv")
def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    T, H, D = k.shape
    if T == 0:
        return
    assert k.stride(2) == 1 and k.stride(1) == D and v.stride(2) == 1 and v.stride(1) == D
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    row = H * D
    _write_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                           ROW=row, ROW_PAD=triton.next_power_of_2(row))


@triton.jit
def _decode_tile(n0, end, q, m, l, acc, kc_ptr, vc_ptr, bt_ptr, s, kvh, scale, stride_kb, stride_ks, stride_kh,
                 stride_bts, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of BLOCK_N context tokens (gathered through the block table) folded into (m, l, acc)."""
    offs_d = tl.arange(0, D)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < end
    blk = tl.load(bt_ptr + s * stride_bts + offs_n // PAGE, mask=nmask, other=0)
    base = blk.to(tl.int64) * stride_kb + (offs_n % PAGE) * stride_ks + kvh * stride_kh
    k = tl.load(kc_ptr + base[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
    v = tl.load(vc_ptr + base[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
    scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_N]
    scores = tl.where(nmask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l, acc


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, seqlen_ptr, qrow_ptr, seqidx_ptr,
                   m_ptr, l_ptr, acc_ptr, scale,
                   stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bts,
                   NSPLIT: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
                   STATIC_ITERS: tl.constexpr):
    i = tl.program_id(0)  # which decode sequence
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    s = tl.load(seqidx_ptr + i)
    row = tl.load(qrow_ptr + s)
    seq_len = tl.load(seqlen_ptr + s)
    chunk = tl.cdiv(tl.cdiv(seq_len, NSPLIT), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None], other=0.0).to(tl.float32)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    if STATIC_ITERS > 0:  # the CPU interpreter cannot loop to a loaded bound: fixed trip count, masked
        for it in range(0, STATIC_ITERS):
            m, l, acc = _decode_tile(start + it * BLOCK_N, end, q, m, l, acc, kc_ptr, vc_ptr, bt_ptr, s, kvh,
                                     scale, stride_kb, stride_ks, stride_kh, stride_bts, D, PAGE, BLOCK_N)
    else:
        for n0 in range(start, start + chunk, BLOCK_N):
            m, l, acc = _decode_tile(n0, end, q, m, l, acc, kc_ptr, vc_ptr, bt_ptr, s, kvh,
                                     scale, stride_kb, stride_ks, stride_kh, stride_bts, D, PAGE, BLOCK_N)
    ws = (i * NUM_Q_HEADS + heads) * NSPLIT + split
    tl.store(m_ptr + ws, m, mask=gmask)
    tl.store(l_ptr + ws, l, mask=gmask)
    tl.store(acc_ptr + ws[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, qrow_ptr, seqidx_ptr, stride_ot, stride_oh,
                  NSPLIT: tl.constexpr, NSPLIT_PAD: tl.constexpr, D: tl.constexpr, NUM_Q_HEADS: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(seqidx_ptr + i)
    row = tl.load(qrow_ptr + s)
    offs = tl.arange(0, NSPLIT_PAD)
    smask = offs < NSPLIT
    base = (i * NUM_Q_HEADS + h) * NSPLIT
    m = tl.load(m_ptr + base + offs, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + base + offs, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(smask & (m > float("-inf")), tl.exp(m - m_max), 0.0)
    offs_d = tl.arange(0, D)
    acc = tl.load(acc_ptr + (base + offs)[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Enough splits to give the GPU ~TACTICS['decode_target_programs'] programs, never splits shorter
    than TACTICS['decode_min_tokens_per_split'] tokens."""
    want = -(-TACTICS["decode_target_programs"] // max(num_seqs * num_kv_heads, 1))
    cap = max(1, max_seq_len // TACTICS["decode_min_tokens_per_split"])
    return max(1, min(want, cap))


def paged_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor,
                 seq_idx: torch.Tensor, num_splits: int | None = None) -> None:
    """Attention for the single query row of each sequence in ``seq_idx`` (device int32 tensor)."""
    n = seq_idx.shape[0]
    if n == 0:
        return
    Hq, D = q.shape[1], q.shape[2]
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    group = Hq // Hkv
    nsplit = num_splits or decode_num_splits(n, Hkv, meta.max_seq_len)
    block_n = TACTICS["decode_block_n"]
    m = torch.empty((n, Hq, nsplit), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((n, Hq, nsplit, D), dtype=torch.float32, device=q.device)
    _decode_kernel[(n, Hkv, nsplit)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, seq_idx, m, l, acc, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0),
        NSPLIT=nsplit, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1), D=D, PAGE=page,
        BLOCK_N=block_n, NUM_Q_HEADS=Hq, num_warps=TACTICS["decode_num_warps"],
        STATIC_ITERS=-(-(-(-meta.max_seq_len // nsplit)) // block_n) if _INTERPRET else 0)
    _merge_kernel[(n, Hq)](m, l, acc, out, meta.query_start_loc, seq_idx, out.stride(0), out.stride(1),
                           NSPLIT=nsplit, NSPLIT_PAD=triton.next_power_of_2(nsplit), D=D, NUM_Q_HEADS=Hq)


@triton.jit
def _prefill_tile(n0, q, m, l, acc, pos_q, seq_len, kc_ptr, vc_ptr, bt_ptr, s, kvh, scale,
                  stride_kb, stride_ks, stride_kh, stride_bts,
                  D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    offs_d = tl.arange(0, D)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < seq_len
    blk = tl.load(bt_ptr + s * stride_bts + offs_n // PAGE, mask=nmask, other=0)
    base = blk.to(tl.int64) * stride_kb + (offs_n % PAGE) * stride_ks + kvh * stride_kh
    k = tl.load(kc_ptr + base[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
    v = tl.load(vc_ptr + base[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        scores = tl.dot(q, tl.trans(k)) * scale
    ok = (offs_n[None, :] <= pos_q[:, None]) & nmask[None, :]
    scores = tl.where(ok, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, bt_ptr, seqlen_ptr, qsl_ptr, tile_seq_ptr, tile_m_ptr, scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bts,
                    GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, IEEE: tl.constexpr, STATIC_ITERS: tl.constexpr):
    """Causal varlen attention for one tile of BLOCK_M query rows of one sequence and one query head,
    over that sequence's whole paged context (cached prefix + the new rows, already written)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(tile_seq_ptr + t)
    m0 = tl.load(tile_m_ptr + t)
    q0 = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q0
    seq_len = tl.load(seqlen_ptr + s)
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < q_len
    pos_q = seq_len - q_len + rows
    offs_d = tl.arange(0, D)
    kvh = h // GROUP
    q = tl.load(q_ptr + (q0 + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=rmask[:, None],
                other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if STATIC_ITERS > 0:  # CPU interpreter: fixed trip count, masked
        for it in range(0, STATIC_ITERS):
            m, l, acc = _prefill_tile(it * BLOCK_N, q, m, l, acc, pos_q, seq_len, kc_ptr, vc_ptr, bt_ptr, s, kvh,
                                      scale, stride_kb, stride_ks, stride_kh, stride_bts, D, PAGE, BLOCK_N, IEEE)
    else:
        hi = tl.minimum(seq_len, seq_len - q_len + m0 + BLOCK_M)  # causal: no key past the tile's last row
        for n0 in range(0, hi, BLOCK_N):
            m, l, acc = _prefill_tile(n0, q, m, l, acc, pos_q, seq_len, kc_ptr, vc_ptr, bt_ptr, s, kvh,
                                      scale, stride_kb, stride_ks, stride_kh, stride_bts, D, PAGE, BLOCK_N, IEEE)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + (q0 + rows)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def paged_prefill(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor,
                  seqs: list[int]) -> None:
    """Attention for every query row of the sequences in ``seqs`` (host list) that prefill > 1 token."""
    bm, bn = TACTICS["prefill_block_m"], TACTICS["prefill_block_n"]
    qsl = meta.query_start_loc_cpu
    tile_seq, tile_m = [], []
    for i in seqs:
        for m0 in range(0, qsl[i + 1] - qsl[i], bm):
            tile_seq.append(i)
            tile_m.append(m0)
    if not tile_seq:
        return
    Hq, D = q.shape[1], q.shape[2]
    group = Hq // k_cache.shape[2]
    dev = q.device
    ts = torch.tensor(tile_seq, dtype=torch.int32, device=dev)
    tm = torch.tensor(tile_m, dtype=torch.int32, device=dev)
    static = -(-meta.max_seq_len // bn) if _INTERPRET else 0
    _prefill_kernel[(len(tile_seq), Hq)](
        q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, ts, tm, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, D=D, PAGE=k_cache.shape[1], BLOCK_M=bm, BLOCK_N=bn, IEEE=q.dtype == torch.float32,
        STATIC_ITERS=static, num_warps=4)


@register("paged_attention")
def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    out = torch.empty_like(q)
    if meta.is_decode_only:
        idx = torch.arange(meta.num_seqs, dtype=torch.int32, device=q.device)
        paged_decode(q, k_cache, v_cache, meta, scale, out, idx)
        return out
    qsl = meta.query_start_loc_cpu
    q_lens = [qsl[i + 1] - qsl[i] for i in range(meta.num_seqs)]
    decode = [i for i, ql in enumerate(q_lens) if ql == 1]
    if decode:
        paged_decode(q, k_cache, v_cache, meta, scale, out,
                     torch.tensor(decode, dtype=torch.int32, device=q.device))
    prefill = [i for i, ql in enumerate(q_lens) if ql > 1]
    if prefill:
        paged_prefill(q, k_cache, v_cache, meta, scale, out, prefill)
    return out


# ---------------------------------------------------------------------------- fused small ops
@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, stride_x, stride_r, stride_o,
                     N: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row * N + offs, x.to(res_out_ptr.dtype.element_ty), mask=mask)
        x = x.to(res_out_ptr.dtype.element_ty).to(tl.float32)  # normalise the rounded sum, as the reference
    var = tl.sum(x * x, axis=0) / N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(var + eps) * w
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rms(x, residual, weight, eps):
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    out = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    r2 = residual.reshape(-1, N) if residual is not None else x2
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, eps, x2.stride(0), r2.stride(0), N,
                                         N=N, BLOCK=triton.next_power_of_2(N), HAS_RES=residual is not None,
                                         num_warps=4 if N <= 4096 else 8)
    return out.view(x.shape), res_out.view(x.shape)


@register("rms_norm")
def rms_norm(x, weight, eps: float) -> torch.Tensor:
    return _rms(x, None, weight, eps)[0]


@register("fused_add_rms_norm")
def fused_add_rms_norm(x, residual, weight, eps: float):
    return _rms(x, residual, weight, eps)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * I + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@register("silu_and_mul")
def silu_and_mul(x) -> torch.Tensor:
    I = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * I)
    out = torch.empty((x2.shape[0], I), dtype=x.dtype, device=x.device)
    block = 1024
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(I, block))](x2, out, x2.stride(0), I=I, BLOCK=block)
    return out.view(*x.shape[:-1], I)


@triton.jit
def _rope_kernel(pos_ptr, x_ptr, out_ptr, cs_ptr, stride_xt, stride_xh, stride_cs, H: tl.constexpr,
                 H_PAD: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF)
    hmask = offs_h < H
    cos = tl.load(cs_ptr + pos * stride_cs + offs_d).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d).to(tl.float32)
    base = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(base, mask=hmask[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=hmask[:, None], other=0.0).to(tl.float32)
    obase = out_ptr + t * (H * 2 * HALF) + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(obase, (x1 * cos[None, :] - x2 * sin[None, :]).to(ty), mask=hmask[:, None])
    tl.store(obase + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(ty), mask=hmask[:, None])


def _rope_one(positions, x, cos_sin_cache):
    T, H, D = x.shape
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T:
        _rope_kernel[(T,)](positions, x, out, cos_sin_cache, x.stride(0), x.stride(1), cos_sin_cache.stride(0),
                           H=H, H_PAD=triton.next_power_of_2(H), HALF=D // 2)
    return out


@register("rotary_embedding")
def rotary_embedding(positions, q, k, cos_sin_cache):
    assert q.stride(2) == 1 and k.stride(2) == 1
    return _rope_one(positions, q, cos_sin_cache), _rope_one(positions, k, cos_sin_cache)
