"""Linear layers as the model sees them: one factory, so quantized variants slot in without model changes.

Layout rule shared by every variant: dimension 0 of every stored tensor is the output channel, so fused
projections (QKV, gate/up) are built by concatenating their parts along dim 0 at build time, and a
per-input-channel tensor (smoothing/AWQ scales) must be identical across the parts of one fused group.
"""
from __future__ import annotations

import torch
from torch import nn

from llmc.config import QuantConfig
from llmc.plugins import ops


class Linear(nn.Module):
    """Unquantized ``y = x W^T + b`` with ``W [out, in]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, norm_eps: float | None = None,
                residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        """``norm_eps`` / ``residual`` / ``swiglu``: see ``ops.linear`` (an RMS norm without weight before, a
        residual or SwiGLU after)."""
        return ops.linear(x, self.weight, self.bias, norm_eps, residual, swiglu)

    def swiglu_fuses(self, x) -> bool:
        """Whether ``forward(x, swiglu=True)`` applies the SwiGLU inside its GEMV (no launch of its own)."""
        return isinstance(x, torch.Tensor) and ops.linear_fuses(x, self.weight)


def make_linear(in_features: int, out_features: int, bias: bool, quant: QuantConfig | None,
                dtype: torch.dtype) -> nn.Module:
    """The linear layer for ``quant`` (``None``/'none' = plain floating point)."""
    if quant is None or not quant.enabled:
        return Linear(in_features, out_features, bias, dtype)
    from llmc.models.quant_linear import make_quant_linear  # quantized variants live beside

    return make_quant_linear(in_features, out_features, bias, quant, dtype)
