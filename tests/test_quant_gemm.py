"""Quantized GEMM kernels (``plugins/quant_gemm.py``) against ``QuantLinear``'s CPU reference forward.

On a CUDA GPU when there is one, else under the Triton interpreter at small sizes. Random weights and
inputs (never zeros); odd M and N cross tile edges; the decode tiling (M <= 16, split K) and the prefill
tiling are both exercised.
"""
from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()

pytest.importorskip("triton", reason="triton is not installed: the quantized GEMM kernels cannot be tested")

from llmc.config import QuantConfig  # noqa: E402
from llmc.convert import quantize as qz  # noqa: E402
from llmc.models import quant_linear as ql  # noqa: E402
from llmc.plugins import gemv  # noqa: E402
from llmc.plugins import quant_gemm as qg  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
METHODS = ["int8", "int4", "int4-awq", "fp8", "w8a8"]


def make_layer(method: str, k: int, n: int, group: int, bias: bool, seed: int) -> ql.QuantLinear:
    g = torch.Generator().manual_seed(seed)
    layer = ql.make_quant_linear(k, n, bias, QuantConfig(method, group_size=group), torch.float32)
    w = torch.randn(n, k, generator=g) * 0.05
    s = torch.rand(k, generator=g) + 0.5 if layer.input_scale is not None else None
    stored = qz.quantize_projection(method, w * s if s is not None else w, group)
    if s is not None:
        stored["input_scale"] = s
    if bias:
        stored["bias"] = torch.randn(n, generator=g)
    for name, v in stored.items():
        getattr(layer, name).data.copy_(v)
    return layer


def run_kernel(layer: ql.QuantLinear, x: torch.Tensor) -> torch.Tensor:
    p = {name: t.to(DEV) for name, t in layer.named_parameters()}
    return qg.qgemm(x.to(DEV), layer.method, p["qweight"], p["scales"], p.get("zeros"),
                    getattr(layer, "group_size", 0), p.get("input_scale"), p.get("bias")).cpu()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m", [1, 5, 19, 70])
def test_qgemm_matches_reference_fp32(method, m):
    k, n = 256, 80  # N not a multiple of the 32/128 tiles
    layer = make_layer(method, k, n, group=64, bias=m == 5, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m))
    ref = layer(x)
    out = run_kernel(layer, x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    half = f16_products_tolerance(method, m, ref)
    if method in ("fp8", "w8a8") and CUDA:
        assert_close_up_to_activation_flips(out, ref, x, layer, half)
    else:
        torch.testing.assert_close(out, ref, atol=2e-4 + half, rtol=1e-4)


def f16_products_tolerance(method: str, m: int, ref: torch.Tensor) -> float:
    """The extra absolute error where a GEMV sums products in f16: fp8 rows (``gemv`` ``q8_half``: runs of 16
    exact products) and int4 rows (``gemv_words`` 3: a word's 8 products in fp16 pairs), 1e-3 of the largest
    output (measured 1.7e-4 for fp8, test_gemv holds it there; about 6e-4 for int4 at K = 4,096)."""
    if method == "fp8" and m <= gemv.TACTICS["q8_max_m"] and gemv.TACTICS["q8_half"]:
        return 1e-3 * ref.abs().max().item()
    if method.startswith("int4") and m <= qg.TACTICS["gemv_max_m"] and qg.TACTICS["gemv_words"] == 3:
        return 1e-3 * ref.abs().max().item()
    return 0.0


def assert_close_up_to_activation_flips(out, ref, x, layer, extra: float = 0.0) -> None:
    """Activation-quantizing GEMMs on the GPU: ``x / scale`` there can differ from the CPU's in the last ulp
    and so land an activation on the neighbouring 8-bit grid point (measured: 5 of 5,600 outputs at M=70,
    fp8). Each such flip moves an output by at most one grid step times a weight; everything else must
    match as tightly as the plain GEMMs (``extra``: plus a kernel's own rounding, f16_products_tolerance)."""
    diff = (out - ref).abs()
    tol = 2e-4 + extra + 1e-4 * ref.abs()
    xs = x / layer.input_scale if layer.input_scale is not None else x
    amax = xs.abs().amax(-1, keepdim=True)
    step = amax / 448 * 32 if layer.method == "fp8" else amax / 127  # the largest grid step, in xs units
    w = layer.qweight.float() * layer.scales.float().reshape(-1, 1)  # dequantized [N, K]
    bound = tol + 2 * step * w.abs().amax(-1)[None, :]
    assert (diff <= bound).all(), (diff - bound).max()
    assert (diff > tol).float().mean() <= 0.005, (diff > tol).float().mean()


@pytest.mark.parametrize("method,dtype", [(m, torch.bfloat16) for m in METHODS]
                         + [("int4", torch.float16), ("int4-awq", torch.float16)])
def test_qgemm_bf16_activations(method, dtype):
    """16-bit inputs (the GPU's dtypes): 16-bit tensor-core dot products, fp32 accumulation (int4: nibbles
    written into 16-bit floats per dtype)."""
    k, n, m = 128, 48, 3
    layer = make_layer(method, k, n, group=32, bias=False, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8)).to(dtype)
    ref = layer(x.float())
    out = run_kernel(layer, x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("method", [pytest.param("fp8", marks=pytest.mark.skipif(
    not CUDA, reason="Triton 3.6's interpreter rounds fp32 -> e4m3 wrongly; the fp8 kernel is checked on the GPU")),
    "w8a8"])
@pytest.mark.parametrize("row_limit", [16384, 64])
def test_activation_quantization_matches_reference(method, row_limit, monkeypatch):
    """Rows held in registers (one pass) and rows wider than ``act_quant_row`` (two 1,024-wide passes, ragged)."""
    monkeypatch.setitem(qg.TACTICS, "act_quant_row", row_limit)
    x = torch.randn(7, 1500, generator=torch.Generator().manual_seed(3)) * 3
    isc = torch.rand(1500, generator=torch.Generator().manual_seed(4)) + 0.5
    q, s = qg.quantize_activations(x.to(DEV), method, isc.to(DEV))
    ref_fn = ql.quantize_act_fp8_per_token if method == "fp8" else ql.quantize_act_int8_per_token
    rq, rs = ref_fn(x / isc)
    torch.testing.assert_close(s.cpu(), rs[:, 0], rtol=1e-6, atol=0)
    assert torch.equal(q.cpu().float(), rq.float())


def test_split_k_is_used_for_small_batches_and_agrees(monkeypatch):
    """Force a split of K into 4 parts: the partial sums and the reduce kernel give the unsplit result."""
    layer = make_layer("int4", 512, 64, group=128, bias=True, seed=11)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(12))
    monkeypatch.setitem(qg.TACTICS, "gemv_max_m", 0)  # the decode tiling, whose K tile small_block_k sets
    monkeypatch.setitem(qg.TACTICS, "small_target_programs", 1)
    one = run_kernel(layer, x)
    monkeypatch.setitem(qg.TACTICS, "small_target_programs", 10_000)
    monkeypatch.setitem(qg.TACTICS, "small_block_k", 64)
    split = run_kernel(layer, x)
    torch.testing.assert_close(split, one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split, layer(x), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_uneven_split_k_agrees(method, monkeypatch):
    """K = 11 tiles of 64 split in 4 (3 + 3 + 3 + 2 tiles): the short last split adds the rest of K."""
    layer = make_layer(method, 704, 48, group=64, bias=True, seed=21)
    x = torch.randn(3, 704, generator=torch.Generator().manual_seed(22))
    monkeypatch.setitem(qg.TACTICS, "small_block_k", 64)
    monkeypatch.setitem(qg.TACTICS, "small_target_programs", 1)
    one = run_kernel(layer, x)
    monkeypatch.setitem(qg.TACTICS, "small_target_programs", 4)
    monkeypatch.setitem(qg.TACTICS, "small_max_split_k", 4)
    assert qg._split_for(11, 1) == 4
    split = run_kernel(layer, x)
    torch.testing.assert_close(split, one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split, layer(x), atol=2e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m", [1, 16, 48, 64, 100, 512])
def test_qgemm_llama_shapes_gpu(method, m):
    """Llama-2-7B's MLP down projection shape (K=11008, N=4096) in bf16, decode (the Triton tiling up to 64 rows)
    and prefill row counts."""
    k, n = 11008, 4096
    layer = make_layer(method, k, n, group=128, bias=False, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    ref = layer(x.float())
    out = run_kernel(layer, x).float()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-2, float(rel)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,words", [(1, 1), (1, 2), (1, 3), (2, 3), (1, 0), (2, 1), (8, 1), (40, 1)])
@pytest.mark.parametrize("stages", [1, 3])  # the GEMV's K loop unpipelined or through shared memory
def test_int4_16bit_activations_gpu(dtype, m, words, stages, monkeypatch):
    """The int4 kernels' inline-PTX nibble conversions (the GEMV's in-place masks, the MMA tiling's
    16-bit ``c * (16 + n)`` lanes, per activation dtype) against the reference on the same rounded inputs,
    K = 4,096 with 32 groups (uneven N)."""
    monkeypatch.setitem(qg.TACTICS, "gemv_words", words)
    monkeypatch.setitem(qg.TACTICS, "gemv_num_stages", stages)
    layer = make_layer("int4", 4096, 1000, group=128, bias=False, seed=60 + m)
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(61 + m)).to(dtype)
    ref = layer(x.float())
    out = run_kernel(layer, x).float()
    torch.testing.assert_close(out, ref, atol=2e-2 * ref.abs().max().item(), rtol=1e-2)
    assert (out - ref).norm() / ref.norm() < 4e-3


@pytest.mark.parametrize("method", ["int4", "int8", "w8a8"])
@pytest.mark.parametrize("swap", [0, 1])
def test_decode_tiling_orientations_agree(method, swap, monkeypatch):
    """The decode tiling computes W x^T (swap) or x W^T; both match the reference, 16- and 32-row tiles."""
    monkeypatch.setitem(qg.TACTICS, "small_swap", swap)
    monkeypatch.setitem(gemv.TACTICS, "q8_max_m", 0)  # keep the fewest rows on the MMA tiling too
    layer = make_layer(method, 256, 48, group=128, bias=True, seed=21 + swap)
    for m in (3, 27):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        torch.testing.assert_close(run_kernel(layer, x), layer(x), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["int4", "int4-awq"])
def test_int4_dequantize_then_matmul_path(method, monkeypatch):
    """Large batches dequantize int4 weights into a scratch buffer for cuBLAS: same result."""
    monkeypatch.setitem(qg.TACTICS, "int4_dequant_min_m", 1)
    layer = make_layer(method, 256, 80, group=64, bias=True, seed=31)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(32))
    torch.testing.assert_close(run_kernel(layer, x), layer(x), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("group,block_k,k", [(32, 128, 448), (64, 64, 448), (64, 256, 448), (128, 256, 512)])
@pytest.mark.parametrize("words", [0, 1, 2, 3])
@pytest.mark.parametrize("stages", [1, 3])
def test_int4_gemv_groups_per_tile_and_split(group, block_k, k, words, stages, monkeypatch):
    """The CUDA-core GEMV for a few rows: one or several groups per K tile, K not a multiple of the tile
    (ragged last split), bytes or int32 words in fp32 or fp16 pairs (``words`` 3: fp16 products, so a
    tolerance of fp16's rounding), with and without split K."""
    monkeypatch.setitem(qg.TACTICS, "gemv_max_m", 3)
    monkeypatch.setitem(qg.TACTICS, "gemv_block_k", block_k)
    monkeypatch.setitem(qg.TACTICS, "gemv_words", words)
    monkeypatch.setitem(qg.TACTICS, "gemv_num_stages", stages)
    layer = make_layer("int4-awq", k, 72, group=group, bias=True, seed=group)
    # a ragged last tile must not read past K: give the kernel views into buffers poisoned with NaN scales
    big = torch.full((k // group + 4, 72), float("nan"))
    big[: k // group] = layer.scales.t()
    scales_gn = big[: k // group]
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(41))
    p = {name: t.to(DEV) for name, t in layer.named_parameters()}
    tol = dict(atol=2e-3, rtol=2e-3) if words == 3 else dict(atol=2e-4, rtol=1e-4)
    for target in (1, 10_000):  # no split / split K as far as the tiles allow
        monkeypatch.setitem(qg.TACTICS, "small_target_programs", target)
        torch.testing.assert_close(run_kernel(layer, x), layer(x), **tol)
        out = qg.qgemm(x.to(DEV), "int4-awq", p["qweight"], p["scales"], p["zeros"], group, p["input_scale"],
                       p["bias"], scales_gn.to(DEV), layer.zeros.t().contiguous().to(DEV)).cpu()
        torch.testing.assert_close(out, layer(x), **tol)


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e4])
def test_int4_gemv_fp16_pairs_hold_any_bf16_range(magnitude, monkeypatch):
    """The fp16-pair GEMV scales each tile's inputs by a power of two before fp16, so inputs far outside
    fp16's range (a word's sums at 3e4 * 8 would overflow; 1e-6 is subnormal) stay within 1e-3 of the
    reference, and a tile of zeros (absmax 0) beside the others stays finite."""
    monkeypatch.setitem(qg.TACTICS, "gemv_words", 3)
    monkeypatch.setitem(qg.TACTICS, "gemv_block_k", 256)
    layer = make_layer("int4", 1024, 40, group=128, bias=False, seed=71)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(72)) * magnitude
    x[:, 256:512] = 0.0  # a whole tile of zeros (amax 0)
    x = x.bfloat16().float()
    ref = layer(x)
    out = run_kernel(layer, x)
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 1e-3


@pytest.mark.parametrize("fuse", [0, 1])
def test_w8a8_fused_activation_quantization(fuse, monkeypatch):
    """Decode rows quantize their activations inside the GEMM (fused) or in a separate kernel: both equal
    the reference, including SmoothQuant's input scale."""
    monkeypatch.setitem(qg.TACTICS, "fuse_act_quant", fuse)
    layer = make_layer("w8a8", 384, 40, group=0, bias=False, seed=51)
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(52)) * 4
    torch.testing.assert_close(run_kernel(layer, x), layer(x), atol=2e-4, rtol=1e-4)
