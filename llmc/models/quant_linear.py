"""Quantized linear layers and their math (docs/quantization.md describes the stored layout).

Every stored tensor keeps the output channel in dim 0 (the builder fuses QKV and gate/up by concatenating
along it); ``input_scale`` is per input channel and shared by the parts of a fused group, so it is listed
in ``SHARED_INPUT_TENSORS`` and stored once per fused module in the engine.

On CUDA the forward runs ``plugins/quant_gemm.py``; the CPU forwards here are the references those
kernels are checked against:
- int8 / int4 / int4-awq (weight-only): dequantize the weight (cached on the CPU) and matmul in float32;
- fp8 (W8A8): quantize each activation row to E4M3 and back, matmul with the dequantized weight in float32;
- w8a8 (SmoothQuant): quantize each activation row to INT8, exact int8 x int8 -> int32 GEMM
  (``torch._int_mm``), then rescale by the token and channel scales.
The small functions below (quantize / dequantize / pack / unpack) are the definitions the kernels reuse.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmc.config import QuantConfig
from llmc.plugins.act_quant import QUANTIZED_INPUT_METHODS, QuantizedRows, check_quantized_input, dequantize_rows
from llmc.plugins import ops

# Per-input-channel tensors: identical across a fused group; the builder keeps one copy (it checks).
SHARED_INPUT_TENSORS = ("input_scale",)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_DEFAULT_GROUP = 128


# ---------------------------------------------------------------------------- weights: INT8
def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: ``w ~= q * scale[:, None]``, q in -127..127 (no -128, so the
    range is symmetric and negation is exact)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


# ---------------------------------------------------------------------------- weights: INT4 group-wise
def quantize_int4_groupwise(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise INT4 along the input dim: ``w ~= (q - zero) * scale`` per group of ``group``
    inputs. Returns q (uint8 0..15, unpacked ``[N, K]``), scales float32 ``[N, K/group]`` and zeros
    (uint8 0..15, ``[N, K/group]``). The range always includes 0 so an all-positive group stays exact-ish."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"input dim {k} is not a multiple of the group size {group}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), scale, zero.to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along the input dim: ``byte[n, j] = q[n, 2j] | q[n, 2j+1] << 4``
    (even input index in the low nibble), so dim 0 stays the output channel."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: ``[N, K/2]`` bytes -> ``[N, K]`` values in 0..15."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], p.shape[1] * 2)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]`` as float32 ``[N, K]``."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    g = k // scales.shape[1]
    return ((q.reshape(n, -1, g) - zeros.float()[..., None]) * scales.float()[..., None]).reshape(n, k)


def fake_quant_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """Quantize-dequantize (what the engine will compute with); used by the AWQ search."""
    q, s, z = quantize_int4_groupwise(w, group)
    n, k = w.shape
    return ((q.float().reshape(n, -1, group) - z.float()[..., None]) * s[..., None]).reshape(n, k)


# ---------------------------------------------------------------------------- FP8 E4M3
def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel E4M3: ``w ~= q.float() * scale[:, None]`` with the row max mapped to 448."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_act_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token E4M3 of activations ``[T, K]``: returns q ``[T, K]`` and scale ``[T, 1]``."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def fake_quant_act_fp8(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic FP8 E4M3 quantize-dequantize of activations."""
    q, s = quantize_act_fp8_per_token(x)
    return q.float() * s


# ---------------------------------------------------------------------------- INT8 activations (W8A8)
def quantize_act_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric INT8: q int8 ``[T, K]`` in -127..127 and scale ``[T, 1]``."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127.0
    return torch.round(x.float() / s).clamp(-127, 127).to(torch.int8), s


def fake_quant_act_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic symmetric INT8 quantize-dequantize of activations."""
    q, s = quantize_act_int8_per_token(x)
    return q.float() * s


def int8_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``y[t, n] = (sum_k xq[t, k] * wq[n, k]) * xs[t] * ws[n]`` with an exact int32 accumulator (what
    cuBLAS / ``torch._int_mm`` computes on the GPU). Float64 emulation where ``_int_mm`` is unavailable."""
    try:
        acc = torch._int_mm(xq, wq.t()).float()
    except RuntimeError:  # shapes/devices _int_mm refuses (e.g. CUDA with M <= 16): exact in float64
        acc = (xq.double() @ wq.double().t()).float()
    return acc * xs * ws.float()[None, :]


# ---------------------------------------------------------------------------- modules
def _p(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


def group_size_of(quant: QuantConfig) -> int:
    return quant.group_size or INT4_DEFAULT_GROUP


class QuantLinear(nn.Module):
    """One quantized projection; parameter names and shapes are the engine's tensor names and shapes
    (all computable from in/out features and the group size, which the runner checks on load)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: QuantConfig, dtype: torch.dtype):
        super().__init__()
        self.method, self.in_features, self.out_features = quant.method, in_features, out_features
        n, k = out_features, in_features
        if self.method in ("int8", "w8a8"):
            self.qweight, self.scales = _p((n, k), torch.int8), _p((n,), torch.float32)
        elif self.method in ("int4", "int4-awq"):
            g = group_size_of(quant)
            if k % g or k % 2:
                raise ValueError(f"in_features {k} is not a multiple of the group size {g}")
            self.group_size = g
            self.qweight = _p((n, k // 2), torch.uint8)
            self.scales, self.zeros = _p((n, k // g), torch.float32), _p((n, k // g), torch.uint8)
        elif self.method == "fp8":
            self.qweight, self.scales = _p((n, k), torch.float8_e4m3fn), _p((n,), torch.float32)
        else:
            raise ValueError(f"unknown quantization method {self.method!r}")
        # x is *divided* by input_scale before the GEMM; the stored weight was multiplied by it.
        self.input_scale = _p((k,), torch.float32) if self.method in ("int4-awq", "w8a8") else None
        self.bias = _p((n,), dtype) if bias else None
        self._dequant: torch.Tensor | None = None
        self._group_major: tuple[torch.Tensor, torch.Tensor] | None = None

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 ``[out, in]`` weight the stored tensors represent, *before* undoing ``input_scale``
        (the forward divides the input instead). Cached on the CPU: weights never change after loading."""
        if self._dequant is not None:
            return self._dequant
        if self.method in ("int8", "w8a8"):
            w = dequantize_int8(self.qweight, self.scales)
        elif self.method in ("int4", "int4-awq"):
            w = dequantize_int4(self.qweight, self.scales, self.zeros)
        else:
            w = dequantize_fp8(self.qweight, self.scales)
        if not w.is_cuda:
            self._dequant = w
        return w

    def effective_weight(self) -> torch.Tensor:
        """The float ``[out, in]`` matrix this layer approximates: ``W = Wq / input_scale`` column-wise."""
        w = self.dequantized_weight()
        return w / self.input_scale[None, :] if self.input_scale is not None else w

    def _load_from_state_dict(self, *args, **kwargs):  # a reload invalidates the derived caches
        self._dequant = self._group_major = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def producer_quant(self) -> tuple[str, torch.Tensor | None] | None:
        """``(method, input_scale)`` when this layer reads per-token quantized rows (fp8, w8a8): the op that
        produces its input can quantize them instead (``act_quant.py``); ``None`` for weight-only methods."""
        return (self.method, self.input_scale) if self.method in QUANTIZED_INPUT_METHODS else None

    def _forward_cuda(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        """The Triton / cuBLASLt kernels of ``plugins/quant_gemm.py``; int4's group scales and zeros are
        transposed once to ``[K/G, N]`` (coalesced loads), the engine's tensors stay as stored."""
        from llmc.plugins.quant_gemm import qgemm

        pre = isinstance(x, QuantizedRows)
        shape = x.q.shape if pre else x.shape
        gs = gz = None
        group = getattr(self, "group_size", 0)
        if group:
            if self._group_major is None or self._group_major[0].device != self.qweight.device:
                self._group_major = (self.scales.t().contiguous(), self.zeros.t().contiguous())
            gs, gz = self._group_major
        y = qgemm(x if pre else x.reshape(-1, shape[-1]), self.method, self.qweight, self.scales,
                  getattr(self, "zeros", None), group, self.input_scale, self.bias, gs, gz)
        return y.reshape(*shape[:-1], self.out_features)

    def swiglu_fuses(self, x) -> bool:
        """Whether ``forward(x, swiglu=True)`` applies the SwiGLU inside its GEMV: float decode rows on the GPU
        against int8 weight-only weights (fp8/w8a8 layers read quantized rows, and int4 has its own GEMV)."""
        from llmc.plugins import gemv

        if self.method != "int8" or not isinstance(x, torch.Tensor) or not x.is_cuda or not x.shape[-1]:
            return False
        return gemv.applies(x.numel() // x.shape[-1], 1, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor | QuantizedRows, swiglu: bool = False) -> torch.Tensor:
        """``x``: float rows, or (fp8/w8a8) rows already quantized by their producer with this layer's
        ``producer_quant``; both give the same result. ``swiglu``: this is a fused gate/up projection and the
        result is ``silu_and_mul`` of it, inside the GEMV where ``swiglu_fuses``."""
        if swiglu:
            if not self.swiglu_fuses(x):
                return ops.silu_and_mul(self.forward(x))
            from llmc.plugins import gemv

            y = gemv.gemv(x.reshape(-1, x.shape[-1]), self.qweight, self.bias, None, self.scales, x.dtype, swiglu=True)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        pre = isinstance(x, QuantizedRows)
        if (x.q if pre else x).is_cuda:
            return self._forward_cuda(x)
        if pre:
            check_quantized_input(self.method)
            shape, out_dtype = x.q.shape, x.dtype
            y = (int8_gemm(x.q, x.scale[:, None], self.qweight, self.scales) if self.method == "w8a8"
                 else F.linear(dequantize_rows(x), self.dequantized_weight()))
        else:
            shape, out_dtype = x.shape, x.dtype
            xf = x.reshape(-1, shape[-1]).float()
            if self.input_scale is not None:
                xf = xf / self.input_scale
            if self.method == "w8a8":
                xq, xs = quantize_act_int8_per_token(xf)
                y = int8_gemm(xq, xs, self.qweight, self.scales)
            else:
                if self.method == "fp8":
                    xf = fake_quant_act_fp8(xf)
                y = F.linear(xf, self.dequantized_weight())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out_dtype).reshape(*shape[:-1], self.out_features)


def make_quant_linear(in_features: int, out_features: int, bias: bool, quant: QuantConfig,
                      dtype: torch.dtype) -> nn.Module:
    """The layer ``llmc.models.linear.make_linear`` returns for a quantized checkpoint."""
    return QuantLinear(in_features, out_features, bias, quant, dtype)
