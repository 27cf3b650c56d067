"""CPU reference implementations of every kernel: plain PyTorch, the source of truth in tests.

Each function here has the exact signature of its fast twin in this package; ``ops.py`` dispatches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmc.plugins.act_quant import QuantizedRows, quantize_rows
from llmc.plugins.kv_layout import KV_QMAX, KV_SCALE_FLOOR, as_bytes
from llmc.plugins.metadata import AttentionMetadata


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> (values in ``dtype`` (float8_e4m3fn or int8), float32 scales ``[...]``), one scale per
    row: ``max|x| / qmax``. int8 rounds half up (``floor(y + 0.5)``, what the Triton kernel computes)."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / KV_QMAX[dtype]).clamp_min(KV_SCALE_FLOOR)
    y = xf / scale[..., None]
    if dtype == torch.int8:
        q = torch.floor(y + 0.5).clamp_(-127, 127).to(torch.int8)
    else:
        q = y.clamp_(-448.0, 448.0).to(dtype)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 ``q * scale`` (one scale per row of ``q``)."""
    return q.float() * scale[..., None]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Scatter new K/V rows ``[T, Hkv, D]`` into the paged caches at ``slot_mapping`` (-1 = skip);
    with scale pools (quantized cache), quantize each (token, head) row on the way."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blk, row = slots // k_cache.shape[1], slots % k_cache.shape[1]  # (block, row) indexing: pools may be strided
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if scales is None:
            cache[blk, row] = x[keep].to(cache.dtype)
            continue
        q, s = quantize_kv(x[keep], cache.dtype)
        as_bytes(cache)[blk, row] = as_bytes(q)
        scales[blk, row] = s


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` over each sequence's paged context (gathered per sequence).

    Query row j of a sequence with ``q_len`` new tokens and ``seq_len`` context sits at position
    ``seq_len - q_len + j`` and sees keys at positions ``<=`` that. Computed in float32; a quantized
    cache (``k_scale``/``v_scale`` given) is dequantized as it is gathered.
    """
    block_size = k_cache.shape[1]
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    qsl = meta.query_start_loc_cpu

    def gather(cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor, n: int) -> torch.Tensor:
        x = cache[blocks].reshape(-1, num_kv_heads, cache.shape[3])[:n].float()
        if scales is not None:
            x = x * scales[blocks].reshape(-1, num_kv_heads)[:n, :, None]
        return x.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]

    for i, seq_len in enumerate(meta.seq_lens_cpu):
        qs, qe = qsl[i], qsl[i + 1]
        q_len = qe - qs
        if q_len == 0:
            continue
        nblocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :nblocks].long()
        k = gather(k_cache, k_scale, blocks, seq_len)
        v = gather(v_cache, v_scale, blocks, seq_len)
        qi = q[qs:qe].float().transpose(0, 1)  # [Hq, q_len, D]
        pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= pos_q[:, None]
        scores = (qi @ k.transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out[qs:qe] = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).to(q.dtype)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, norm_eps: float | None = None,
           residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """``x @ weight^T + bias``. ``norm_eps``: ``x``'s rows are RMS-normalized first, without a norm weight (the
    model folds it into ``weight``); ``residual``: added to the result. With either, computed in fp32 and
    rounded once, as the fused GEMV does. ``swiglu``: ``weight`` is a fused gate/up projection and the result
    is ``silu_and_mul`` of the (rounded) product, as the GEMV's SwiGLU epilogue computes it."""
    if swiglu:
        return silu_and_mul(linear(x, weight, bias, norm_eps, residual))
    if norm_eps is None and residual is None:
        return F.linear(x, weight, bias)
    xf = x.float()
    if norm_eps is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm_eps)
    y = F.linear(xf, weight.float(), None if bias is None else bias.float())
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x``; returns ``(rms_norm(residual), residual)`` (new tensors, inputs untouched)."""
    res = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(res, weight, eps), res


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate/up projection ``[..., 2 * I]`` (gate first)."""
    d = x.shape[-1] // 2
    return (F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) RoPE on ``q [T, Hq, D]``, ``k [T, Hkv, D]``.

    ``cos_sin_cache [max_pos, D]`` holds cos in the first D/2 columns, sin in the last D/2.
    """
    cs = cos_sin_cache[positions].float()
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


# ---------------------------------------------------------------------------- fused producers
def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, method: str,
                   input_scale: torch.Tensor | None = None) -> QuantizedRows:
    """``rms_norm``, its rows quantized per token for a ``method`` (fp8 / w8a8) linear."""
    return quantize_rows(rms_norm(x, weight, eps).reshape(-1, x.shape[-1]), method, input_scale)


def fused_add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             method: str, input_scale: torch.Tensor | None = None):
    """``fused_add_rms_norm`` with the normalized rows quantized as ``rms_norm_quant``."""
    normed, res = fused_add_rms_norm(x, residual, weight, eps)
    return quantize_rows(normed.reshape(-1, x.shape[-1]), method, input_scale), res


def silu_and_mul_quant(x: torch.Tensor, method: str, input_scale: torch.Tensor | None = None) -> QuantizedRows:
    """``silu_and_mul``, its rows quantized per token for a ``method`` linear."""
    y = silu_and_mul(x)
    return quantize_rows(y.reshape(-1, y.shape[-1]), method, input_scale)


def rope_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``rotary_embedding`` of q and k, then ``write_kv`` of the rotated k and v; returns the rotated q."""
    q, k = rotary_embedding(positions, q, k, cos_sin_cache)
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q
