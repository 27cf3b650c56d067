"""Kernel dispatch: the model calls these; CUDA tensors go to the fast kernels, CPU tensors to the reference.

Fast kernels register themselves in ``_FAST`` (see ``triton_kernels.py``); a kernel that is not registered
falls back to its reference, so the model always runs.
"""
from __future__ import annotations

from typing import Callable

import torch

from llmc.plugins import reference

_FAST: dict[str, Callable] = {}
_loaded = False

# Fusions the model uses where they apply (switchable for before/after measurements, benchmarks/decode_latency.py):
# "rope_write_kv": RoPE applied while writing K/V into the cache; "act_quant": RMSNorm and SwiGLU write the
# per-token quantized rows an fp8/w8a8 linear reads. Either way the results are the same bits.
# "norm_gemv": on the GPU, 16-bit QKV and gate/up weights absorb their RMSNorm's weight at load, so a decode
# row's norm runs inside the GEMV, and the O/down GEMVs add the residual (two launches fewer per layer;
# rounding differs from the separate ops, see ``LlamaForCausalLM.fold_norms``). Off by default: on the H200 it
# was neutral untuned and 0.056 ms/step slower with tuned GEMV tiles at batch 1 (BENCHMARKS.md, 2026-12-03).
# "swiglu_gemv": a decode row's SwiGLU runs in the gate/up GEMV's epilogue (16-bit and int8 weight-only gate/up
# projections; fp8/w8a8 down projections read quantized rows from ``silu_and_mul_quant`` instead): the same
# bits as the separate kernel, one launch fewer per layer (H200 bf16 batch 1: -0.025 to -0.034 ms/step).
FUSIONS: dict[str, bool] = {"rope_write_kv": True, "act_quant": True, "norm_gemv": False, "swiglu_gemv": True}


def _fast(name: str, t: torch.Tensor) -> Callable | None:
    global _loaded
    if not t.is_cuda:
        return None
    if not _loaded:
        _loaded = True
        try:
            from llmc.plugins import triton_kernels  # noqa: F401  (registers into _FAST)
        except ImportError:  # no triton: the references run everywhere
            pass
    return _FAST.get(name)


def has_fast(name: str) -> bool:
    """Whether a graph-safe CUDA kernel is registered for ``name`` (the reference loops on the host)."""
    _fast(name, torch.empty(0, device="cuda") if torch.cuda.is_available() else torch.empty(0))
    return name in _FAST


def register(name: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _FAST[name] = fn
        return fn

    return deco


def linear(x, weight, bias=None, norm_eps: float | None = None, residual=None, swiglu: bool = False) -> torch.Tensor:
    """``x @ weight^T + bias`` for a float weight; on the GPU, decode rows stream it through ``gemv.py``.
    ``norm_eps``: RMS-normalize ``x``'s rows first (no norm weight); ``residual``: add it to the result;
    ``swiglu``: ``silu_and_mul`` of the result, for a fused gate/up weight (``reference.linear``); all three are
    free inside the GEMV (``linear_fuses``)."""
    return (_fast("linear", x) or reference.linear)(x, weight, bias, norm_eps, residual, swiglu)


def linear_fuses(x, weight) -> bool:
    """Whether ``linear(x, weight, ...)`` runs as the GEMV here, where a norm or residual add costs no launch."""
    fn = _fast("linear_fuses", x)
    return fn is not None and fn(x, weight)


def write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Scales given: a quantized cache (quantize on write, see ``metadata.py``)."""
    (_fast("write_kv", k) or reference.write_kv)(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_attention(q, k_cache, v_cache, meta, scale: float, k_scale=None, v_scale=None) -> torch.Tensor:
    """Scales given: a quantized cache (dequantize on read)."""
    return (_fast("paged_attention", q) or reference.paged_attention)(q, k_cache, v_cache, meta, scale,
                                                                      k_scale, v_scale)


def rms_norm(x, weight, eps: float) -> torch.Tensor:
    return (_fast("rms_norm", x) or reference.rms_norm)(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps: float):
    return (_fast("fused_add_rms_norm", x) or reference.fused_add_rms_norm)(x, residual, weight, eps)


def silu_and_mul(x) -> torch.Tensor:
    return (_fast("silu_and_mul", x) or reference.silu_and_mul)(x)


def rotary_embedding(positions, q, k, cos_sin_cache):
    return (_fast("rotary_embedding", q) or reference.rotary_embedding)(positions, q, k, cos_sin_cache)


def rope_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """RoPE on q and k, k and v written to the cache; returns the rotated q (one launch on the GPU)."""
    fn = _fast("rope_write_kv", q) if FUSIONS["rope_write_kv"] else None
    if fn is None:
        q, k = rotary_embedding(positions, q, k, cos_sin_cache)
        write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return q
    return fn(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rms_norm_quant(x, weight, eps: float, method: str, input_scale=None):
    """``rms_norm`` quantized per token for a ``method`` (fp8/w8a8) linear: ``act_quant.QuantizedRows``."""
    return (_fast("rms_norm_quant", x) or reference.rms_norm_quant)(x, weight, eps, method, input_scale)


def fused_add_rms_norm_quant(x, residual, weight, eps: float, method: str, input_scale=None):
    """``(rms_norm_quant(x + residual), x + residual)``."""
    return (_fast("fused_add_rms_norm_quant", x) or reference.fused_add_rms_norm_quant)(
        x, residual, weight, eps, method, input_scale)


def silu_and_mul_quant(x, method: str, input_scale=None):
    """``silu_and_mul`` quantized per token for a ``method`` linear: ``act_quant.QuantizedRows``."""
    return (_fast("silu_and_mul_quant", x) or reference.silu_and_mul_quant)(x, method, input_scale)
