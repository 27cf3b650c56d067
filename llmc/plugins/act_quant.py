"""Activations quantized per token by the op that produced them, for the W8A8 linear that reads them.

An fp8 or w8a8 linear quantizes each input row (``s = max|x / input_scale| / qmax``) before its GEMM. Done
there, that is one more kernel launch and one more round trip of the activations per projection; the
producing op (RMSNorm, SwiGLU) already holds the row in registers, so it writes the 8-bit row and its
scale instead of the 16-bit row (``ops.rms_norm_quant`` and friends). The result is the same bits the
linear would have computed from the 16-bit row: the producer rounds to the activation dtype first.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

QUANTIZED_INPUT_METHODS = ("fp8", "w8a8")


class QuantizedRows(NamedTuple):
    """``q [T, K]`` (float8_e4m3fn for fp8, int8 for w8a8), per-row fp32 ``scale [T]`` with
    ``x / input_scale ~= q * scale``, and ``dtype``: the rows' dtype before quantization (the GEMM's output)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def check_quantized_input(method: str) -> None:
    """Refuse quantized rows for a method whose linear reads float activations (weight-only int8/int4)."""
    if method not in QUANTIZED_INPUT_METHODS:
        raise ValueError(f"{method!r} linears take float activations; only {QUANTIZED_INPUT_METHODS} read "
                         "per-token quantized rows")


def empty_rows(rows: int, k: int, method: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``(q [rows, k], scale [rows])`` in ``method``'s storage (e4m3 for fp8, int8 for w8a8)."""
    check_quantized_input(method)
    dtype = torch.float8_e4m3fn if method == "fp8" else torch.int8
    return (torch.empty((rows, k), dtype=dtype, device=device),
            torch.empty((rows,), dtype=torch.float32, device=device))


def quantize_rows(x: torch.Tensor, method: str, input_scale: torch.Tensor | None) -> QuantizedRows:
    """Reference per-token quantization of ``x [T, K]`` for a ``method`` linear (``quant_linear``'s math)."""
    from llmc.models.quant_linear import quantize_act_fp8_per_token, quantize_act_int8_per_token

    check_quantized_input(method)
    xf = x.float()
    if input_scale is not None:
        xf = xf / input_scale
    q, s = (quantize_act_fp8_per_token if method == "fp8" else quantize_act_int8_per_token)(xf)
    return QuantizedRows(q, s[:, 0], x.dtype)


def dequantize_rows(rows: QuantizedRows) -> torch.Tensor:
    """Float32 ``q * scale``: what the linear's reference multiplies (``input_scale`` stays divided out)."""
    return rows.q.float() * rows.scale[:, None]
