"""Quantized linear layers and their math (docs/quantization.md describes the stored layout).

Every stored tensor keeps the output channel in dim 0 (the builder fuses QKV and gate/up by concatenating
along it); ``input_scale`` is per input channel and shared by the parts of a fused group. The forwards here
are the CPU references: weights are dequantized (and cached, on the CPU only) and activations of the W8A8
methods are quantized per token and dequantized, which emulates the integer/FP8 GEMMs exactly up to float32
accumulation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmc.config import QuantConfig

SHARED_INPUT_TENSORS = ("input_scale",)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


# ---------------------------------------------------------------------------- math (also kernel references)
def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: ``w ~= q * scale[:, None]``."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def quantize_int4_groupwise(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise INT4 along the input dim: ``w ~= (q - zero) * scale`` per group of ``group``
    inputs; returns (q uint8 in 0..15, unpacked [N, K]), scales [N, K/group], zeros uint8 [N, K/group]."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), scale, zero.to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along the input dim: even input index in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    out = torch.empty(p.shape[0], p.shape[1] * 2, dtype=torch.uint8, device=p.device)
    out[:, 0::2] = p & 0xF
    out[:, 1::2] = p >> 4
    return out


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float()
    n, k = q.shape
    g = k // scales.shape[1]
    return ((q.reshape(n, -1, g) - zeros.float()[..., None]) * scales.float()[..., None]).reshape(n, k)


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).float().clamp(min=1e-12) / FP8_MAX
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fake_quant_act_fp8(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic FP8 E4M3 quantize-dequantize of activations."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s


def fake_quant_act_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic symmetric INT8 quantize-dequantize of activations."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127.0
    return torch.round(x.float() / s).clamp(-127, 127) * s


# ---------------------------------------------------------------------------- modules
def _p(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class QuantLinear(nn.Module):
    """One quantized projection; parameter names and shapes are the engine's tensor names and shapes."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: QuantConfig, dtype: torch.dtype):
        super().__init__()
        self.method, self.in_features, self.out_features = quant.method, in_features, out_features
        n, k = out_features, in_features
        if self.method == "int8":
            self.qweight, self.scales = _p((n, k), torch.int8), _p((n,), torch.float32)
        elif self.method in ("int4", "int4-awq"):
            g = quant.group_size or 128
            if k % g:
                raise ValueError(f"in_features {k} is not a multiple of the group size {g}")
            self.qweight = _p((n, k // 2), torch.uint8)
            self.scales, self.zeros = _p((n, k // g), torch.float32), _p((n, k // g), torch.uint8)
        elif self.method == "fp8":
            self.qweight, self.scales = _p((n, k), torch.float8_e4m3fn), _p((n,), torch.float32)
        elif self.method == "w8a8":
            self.qweight, self.scales = _p((n, k), torch.int8), _p((n,), torch.float32)
        else:
            raise ValueError(f"unknown quantization method {self.method!r}")
        if self.method in ("int4-awq", "w8a8"):
            self.input_scale = _p((k,), torch.float32)
        self.bias = _p((n,), dtype) if bias else None
        self._dequant: torch.Tensor | None = None

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 ``[out, in]`` weight the quantized tensors represent (input scaling folded back in for
        AWQ is *not* applied: the forward divides the input instead)."""
        if self._dequant is not None:
            return self._dequant
        if self.method in ("int8", "w8a8"):
            w = self.qweight.float() * self.scales[:, None]
        elif self.method in ("int4", "int4-awq"):
            w = dequantize_int4(self.qweight, self.scales, self.zeros)
        else:
            w = self.qweight.float() * self.scales[:, None]
        if not w.is_cuda:  # CPU reference: cache (weights never change after loading)
            self._dequant = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.method in ("int4-awq", "w8a8"):
            xf = xf / self.input_scale
        if self.method == "fp8":
            xf = fake_quant_act_fp8(xf)
        elif self.method == "w8a8":
            xf = fake_quant_act_int8(xf)
        y = F.linear(xf, self.dequantized_weight())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def make_quant_linear(in_features: int, out_features: int, bias: bool, quant: QuantConfig,
                      dtype: torch.dtype) -> nn.Module:
    return QuantLinear(in_features, out_features, bias, quant, dtype)
