"""What one layer's paged KV cache is made of, for the model, the runner and the kernels.

Per layer a K pool and a V pool shaped ``[num_blocks, block_size, num_kv_heads, head_dim]`` (see
``metadata.py`` for how tokens find their rows). A quantized cache (``llmc build --kv-cache-dtype fp8|int8``)
stores them in one byte per element plus one float32 scale per (token, KV head), pools shaped
``[num_blocks, block_size, num_kv_heads]``. The scale is computed when the token is written
(max |x| over head_dim / qmax), so no calibration is needed and an outlier token or head costs only its
own precision; attention dequantizes on read (x = q * scale).

Pool shapes are logical: kernels and references index ``[block, row, head, d]`` through strides. A 1-byte V
pool is stored head_dim-major within each page (physically ``[num_blocks, num_kv_heads, head_dim,
block_size]``, strides ``(H*D*P, 1, D*P, P)``), so the probability x V dot reads token pairs that are adjacent
bytes: row-major 1-byte V tiles had to be read from shared memory a byte at a time (``LDS.U8`` and permutes,
1.9x bf16's instructions per tile, BENCHMARKS.md). K stays row-major: its dot reduces over head_dim.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from llmc.errors import ConfigError

# --kv-cache-dtype -> storage dtype; "auto" stores K/V in the model's compute dtype
KV_QUANT_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
KV_QMAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
# Scales never go below this, so an all-zero row quantizes to zeros instead of dividing by zero.
KV_SCALE_FLOOR = 1e-12
KV_SCALE_DTYPE = torch.float32


class KVCache(NamedTuple):
    """One layer's paged cache: K and V pools, and for a quantized cache their per-(token, head) scales."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors viewed as uint8 (same bytes): some torch builds lack indexing ops for float8."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def kv_storage_dtype(kv_cache_dtype: str, device: torch.device | str) -> torch.dtype | None:
    """The element dtype of a ``--kv-cache-dtype`` cache on ``device`` (None: the compute dtype).

    Raises ``ConfigError`` where the device cannot run it: Triton converts fp8 e4m3 in hardware only from
    compute capability 8.9 (Ada, Hopper) on."""
    if kv_cache_dtype == "auto":
        return None
    if kv_cache_dtype not in KV_QUANT_DTYPES:
        raise ConfigError(f"--kv-cache-dtype must be one of auto, {', '.join(KV_QUANT_DTYPES)}; "
                          f"got {kv_cache_dtype!r}")
    device = torch.device(device)
    if kv_cache_dtype == "fp8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ConfigError(f"--kv-cache-dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                              f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Rebuild the engine with "
                              "--kv-cache-dtype int8 (or auto)")
    return KV_QUANT_DTYPES[kv_cache_dtype]


def kv_bytes_per_token_head(head_dim: int, dtype: torch.dtype, quantized: bool) -> int:
    """Bytes one token takes in one KV head of one layer, K and V together (scales included)."""
    esize = torch.empty((), dtype=dtype).element_size()
    scale = torch.empty((), dtype=KV_SCALE_DTYPE).element_size() if quantized else 0
    return 2 * (head_dim * esize + scale)


def v_pages_dmajor(dtype: torch.dtype) -> bool:
    """Whether V pools of this dtype are stored head_dim-major within each page: the 1-byte ones."""
    return torch.empty((), dtype=dtype).element_size() == 1


def v_cache_layout(v: torch.Tensor) -> torch.Tensor:
    """``v`` (a pool ``[num_blocks, block_size, H, D]``, any strides) in the page layout caches of its dtype
    use (``v_pages_dmajor``). Same values and shape."""
    if not v_pages_dmajor(v.dtype):
        return v.contiguous()
    return v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      quantized: bool, device: torch.device | str) -> KVCache:
    """Zeroed pools for one layer (zero scales too: CUDA-graph padding rows read block 0 and must see
    finite values)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.zeros(shape, dtype=dtype, device=device)
    if v_pages_dmajor(dtype):  # allocated in place, not via v_cache_layout: a pool can be most of the GPU
        v = torch.zeros((num_blocks, num_kv_heads, head_dim, block_size), dtype=dtype,
                        device=device).permute(0, 3, 1, 2)
    else:
        v = torch.zeros(shape, dtype=dtype, device=device)
    if not quantized:
        return KVCache(k, v)
    return KVCache(k, v, torch.zeros(shape[:3], dtype=KV_SCALE_DTYPE, device=device),
                   torch.zeros(shape[:3], dtype=KV_SCALE_DTYPE, device=device))
