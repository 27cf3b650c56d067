"""The decode-rows GEMV (``plugins/gemv.py``) against ``F.linear`` / ``QuantLinear``'s CPU reference.

On a CUDA GPU when there is one, else under the Triton interpreter at small sizes. Random inputs; N not a
multiple of the row block, K with and without a ragged tail, 1..4 rows (3 leaves a masked row in a 4-row
block), 16-bit, fp32 and 8-bit weights, float and per-token quantized activations.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()

pytest.importorskip("triton", reason="triton is not installed: the GEMV kernel cannot be tested")

from llmc.plugins import gemv  # noqa: E402
from llmc.plugins import quant_gemm as qg  # noqa: E402
from llmc.plugins import ops, reference  # noqa: E402
from tests.test_quant_gemm import make_layer, run_kernel  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def triton_rows(m: int) -> int:
    """The kernel's row block for ``m`` rows (a power of two)."""
    return 1 << (m - 1).bit_length()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("k", [256, 200])  # whole 64-wide tiles, or a ragged tail
@pytest.mark.parametrize("x_vector", [0, 1])  # activations in the tile's shape, or one vector broadcast
@pytest.mark.parametrize("stages", [1, 3])  # plain loop, or tiles copied ahead through shared memory
def test_gemv_matches_linear(dtype, m, k, x_vector, stages, monkeypatch):
    monkeypatch.setitem(gemv.TACTICS, "block_k", 64 * triton_rows(m))  # several tiles even at small K
    monkeypatch.setitem(gemv.TACTICS, "x_vector", x_vector)
    monkeypatch.setitem(gemv.TACTICS, "stages", stages)
    n = 37
    x = torch.randn(m, k, generator=_gen(m)).to(dtype)
    w = (torch.randn(n, k, generator=_gen(k)) * 0.05).to(dtype)
    b = torch.randn(n, generator=_gen(1)).to(dtype)
    out = gemv.gemv(x.to(DEV), w.to(DEV), b.to(DEV)).cpu()
    ref = F.linear(x.float(), w.float(), b.float())
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("k", [256, 200, 40])  # whole tiles, a ragged tail after them, only a tail
@pytest.mark.parametrize("prefetch,tail_first", [(0, 1), (1, 0), (1, 1)])  # no tile before the PDL wait, the first
def test_gemv_tail_order(k, prefetch, tail_first, monkeypatch):  # whole one, or the ragged tail
    """With ``prefetch`` the ragged K tail is the tile loaded before the loop; either order sums every tile
    once (here fp32, so any tile missed or counted twice shows far above the tolerance)."""
    monkeypatch.setitem(gemv.TACTICS, "block_k", 64)
    monkeypatch.setitem(gemv.TACTICS, "stages", 3)
    monkeypatch.setitem(gemv.TACTICS, "prefetch", prefetch)
    monkeypatch.setitem(gemv.TACTICS, "tail_first", tail_first)  # 32-bit weights: not the f16 products' key
    x = torch.randn(1, k, generator=_gen(k + 5))
    w = torch.randn(21, k, generator=_gen(k + 6))
    out = gemv.gemv(x.to(DEV), w.to(DEV)).cpu()
    torch.testing.assert_close(out, F.linear(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k", [256, 200])
@pytest.mark.parametrize("block_n", [2, 8])  # one gate and one up row per program, or 4 of each
def test_gemv_swiglu_is_the_separate_kernels(weights, m, k, block_n, monkeypatch):
    """The SwiGLU in the gate/up GEMV's epilogue (``swiglu``): each program's gate rows and the up rows I
    below them; the result is the separate GEMV's output put through ``silu_and_mul``, bit for bit (the
    same per-row sums, rounded to the output dtype before the SwiGLU), and near the fp32 reference. I = 37:
    the last program has gate rows past I, masked."""
    key = "q8_block_n" if weights == "int8" else "block_n"
    monkeypatch.setitem(gemv.TACTICS, key, block_n)
    monkeypatch.setitem(gemv.TACTICS, "q8_block_k" if weights == "int8" else "block_k", 64 * triton_rows(m))
    i = 37
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    x = torch.randn(m, k, generator=_gen(m + 40)).to(dtype)
    b = (torch.randn(2 * i, generator=_gen(41)) * 0.5).to(dtype)
    if weights == "int8":
        w = torch.randint(-127, 128, (2 * i, k), generator=_gen(k + 42), dtype=torch.int8)
        ws = torch.rand(2 * i, generator=_gen(43)) * 0.01 + 0.001
        args, ref_w = (w.to(DEV), b.to(DEV), None, ws.to(DEV), dtype), w.float() * ws[:, None]
    else:
        w = (torch.randn(2 * i, k, generator=_gen(k + 42)) * 0.05).to(dtype)
        args, ref_w = (w.to(DEV), b.to(DEV)), w.float()
    fused = gemv.gemv(x.to(DEV), *args, swiglu=True).cpu()
    separate = ops.silu_and_mul(gemv.gemv(x.to(DEV), *args)).cpu()  # what the model ran before
    assert fused.shape == (m, i) and fused.dtype == dtype
    # on the GPU the separate SwiGLU kernel uses the epilogue's formula: the same bits. Here the CPU reference's
    # F.silu can differ in the last fp32 bit, and the interpreter's own fp32 -> bf16 cast is not torch's
    # round-to-nearest (one bf16 step apart)
    exact = 0 if CUDA else (1e-6 if dtype == torch.float32 else 2 ** -7)
    torch.testing.assert_close(fused, separate, atol=exact, rtol=exact)
    ref = reference.silu_and_mul(F.linear(x.float(), ref_w, b.float()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused.float(), ref, atol=tol, rtol=tol)


def test_gemv_swiglu_refuses_odd_rows_and_residuals():
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="even number of gate/up rows"):
        gemv.gemv(x.to(DEV), torch.randn(7, 64).to(DEV), swiglu=True)
    with pytest.raises(ValueError, match="no residual"):
        gemv.gemv(x.to(DEV), torch.randn(8, 64).to(DEV), residual=torch.randn(1, 4).to(DEV), swiglu=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k", [256, 200])
@pytest.mark.parametrize("x_vector", [0, 1])
@pytest.mark.parametrize("fused", ["norm", "residual", "both", "both, 3 stages"])
def test_gemv_fused_norm_and_residual(dtype, m, k, x_vector, fused, monkeypatch):
    """The RMS norm summed inside the GEMV (the squares of every K tile, ragged tail included, per row) and
    the residual added in its epilogue, against ``reference.linear``; rows of very different scales, so a
    norm that mixed rows or missed a tile would show."""
    from llmc.plugins import reference

    monkeypatch.setitem(gemv.TACTICS, "block_k", 64 * triton_rows(m))
    monkeypatch.setitem(gemv.TACTICS, "x_vector", x_vector)
    monkeypatch.setitem(gemv.TACTICS, "stages", 3 if "stages" in fused else 1)
    fused = fused.split(",")[0]
    n, eps = 37, 1e-5
    x = (torch.randn(m, k, generator=_gen(m)) * torch.logspace(-1, 1, m)[:, None]).to(dtype)
    w = (torch.randn(n, k, generator=_gen(k)) * 0.05).to(dtype)
    b = torch.randn(n, generator=_gen(1)).to(dtype)
    r = torch.randn(m, n, generator=_gen(2)).to(dtype)
    norm_eps = eps if fused in ("norm", "both") else None
    res = r if fused in ("residual", "both") else None
    out = gemv.gemv(x.to(DEV), w.to(DEV), b.to(DEV), norm_eps=norm_eps,
                    residual=None if res is None else res.to(DEV)).cpu()
    ref = reference.linear(x.float(), w.float(), b.float(), norm_eps, None if res is None else res.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    if norm_eps is not None:  # and it is a norm: scaling a row (eps aside) leaves its result unchanged
        scaled = [gemv.gemv((x.float() * f).to(dtype).to(DEV), w.to(DEV), norm_eps=1e-12).cpu() for f in (1, 8)]
        torch.testing.assert_close(scaled[1].float(), scaled[0].float(), atol=tol, rtol=tol)


def test_gemv_fused_norm_rejects_quantized_rows_and_bad_residual():
    x, w = torch.randn(1, 64, device=DEV), torch.randn(8, 64, device=DEV)
    with pytest.raises(ValueError, match="quantized"):
        gemv.gemv(x, w, x_scale=torch.ones(1, device=DEV), norm_eps=1e-5)
    with pytest.raises(ValueError, match="residual"):
        gemv.gemv(x, w, residual=torch.randn(1, 9, device=DEV))


def test_gemv_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="columns"):
        gemv.gemv(torch.randn(1, 64, device=DEV), torch.randn(8, 32, device=DEV))


@pytest.mark.parametrize("method", ["int8", "fp8", "w8a8"])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("x_vector", [0, 1])
@pytest.mark.parametrize("stages", [1, 3])
def test_qgemm_decode_rows_take_the_gemv_and_match(method, m, x_vector, stages, monkeypatch):
    """int8 weights with float rows (W8A16), fp8 and int8 W8A8 (quantized rows, SmoothQuant's input scale):
    the GEMV equals the reference and the MMA decode tiling it replaces."""
    monkeypatch.setitem(gemv.TACTICS, "q8_block_k", 128)
    monkeypatch.setitem(gemv.TACTICS, "q8_x_vector", x_vector)
    monkeypatch.setitem(gemv.TACTICS, "q8_stages", stages)
    monkeypatch.setitem(gemv.TACTICS, "q8_block_n", 8)  # several rows per thread, so x_vector broadcasts
    monkeypatch.setitem(gemv.TACTICS, "q8_max_m", 4)
    monkeypatch.setitem(gemv.TACTICS, "w8a8_gemv", 1)
    monkeypatch.setitem(gemv.TACTICS, "q8_half", 0)  # fp32 products, exact: the f16 ones have their own tests
    layer = make_layer(method, 448, 72, group=0, bias=True, seed=60 + m)
    x = torch.randn(m, 448, generator=_gen(70 + m)) * 2
    out = run_kernel(layer, x)
    calls, real = [], gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    run_kernel(layer, x)
    assert calls, "decode rows did not take the GEMV"
    monkeypatch.setitem(gemv.TACTICS, "q8_max_m", 0)
    mma = run_kernel(layer, x)
    torch.testing.assert_close(out, layer(x), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out, mma, atol=2e-4, rtol=1e-4)


def spy_half(monkeypatch) -> list:
    """The ``HALF`` constexpr of every GEMV launch from now on (so a test knows the f16 path really ran)."""
    seen, real = [], gemv._gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["HALF"])
                return real[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(gemv, "_gemv_kernel", Spy())
    return seen


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("stages", [1, 3])
def test_fp8_gemv_with_f16_products_matches(m, stages, monkeypatch):
    """``q8_half``: e4m3 rows times e4m3 weights multiplied in f16 and summed 16 at a time. Exact products,
    f16 partial sums: within 1e-3 of the largest output of the fp32 GEMV (and of the reference), ragged K
    tail and a masked row included."""
    for prefix in ("q8_", "h8_"):  # the fp32 products' tiles and the f16 products' own
        monkeypatch.setitem(gemv.TACTICS, prefix + "block_k", 128)
        monkeypatch.setitem(gemv.TACTICS, prefix + "block_n", 8)
        monkeypatch.setitem(gemv.TACTICS, prefix + "stages", stages)
    monkeypatch.setitem(gemv.TACTICS, "q8_max_m", 4)
    layer = make_layer("fp8", 448, 72, group=0, bias=True, seed=75 + m)  # 448: three tiles and a half
    x = torch.randn(m, 448, generator=_gen(76 + m)) * 3
    monkeypatch.setitem(gemv.TACTICS, "q8_half", 0)
    seen = spy_half(monkeypatch)
    exact = run_kernel(layer, x)
    monkeypatch.setitem(gemv.TACTICS, "q8_half", 1)
    half = run_kernel(layer, x)
    assert seen == [False, True], seen  # both rows went through the GEMV, the second in f16
    scale = exact.abs().max().item()
    torch.testing.assert_close(half, exact, atol=1e-3 * scale, rtol=0)  # measured: 1.7e-4 of the largest
    if not CUDA:  # on the GPU activations may round to a neighbouring e4m3 value (test_quant_gemm's flips);
        torch.testing.assert_close(half, layer(x), atol=1e-3 * scale, rtol=0)  # there exact is the check


def test_fp8_gemv_f16_products_do_not_overflow_at_the_largest_values(monkeypatch):
    """Every product at e4m3's largest magnitude (448 x 448 before the 2^-8 prescale): the f16 sums of 16 stay
    finite and exact, and the result equals the fp32 GEMV's."""
    from llmc.plugins.act_quant import quantize_rows

    monkeypatch.setitem(gemv.TACTICS, "q8_block_k", 128)
    monkeypatch.setitem(gemv.TACTICS, "h8_block_k", 128)
    n, k = 40, 512
    qw = torch.full((n, k), 448.0).to(torch.float8_e4m3fn)
    ws = torch.full((n,), 1e-3)
    x = torch.full((1, k), 7.0)
    q = torch.full((1, k), 448.0).to(torch.float8_e4m3fn)
    xs = torch.full((1,), 7.0 / 448)
    if CUDA:  # the interpreter's fp32 -> e4m3 rounding is wrong at binade edges; 448 itself is exact
        rows = quantize_rows(x.to(DEV).bfloat16(), "fp8", None)
        q, xs = rows.q, rows.scale
    outs, seen = [], spy_half(monkeypatch)
    for half in (0, 1):
        monkeypatch.setitem(gemv.TACTICS, "q8_half", half)
        outs.append(gemv.gemv(q.to(DEV), qw.to(DEV), None, xs.to(DEV).float(), ws.to(DEV), torch.float32).cpu())
    assert seen == [False, True] and torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=1e-6)
    torch.testing.assert_close(outs[0], torch.full((1, n), 448.0 * k * 7.0 * 1e-3), rtol=1e-5, atol=0)


def test_f16_products_take_their_own_tiles_and_only_fp8_by_fp8(monkeypatch):
    """``h8_*`` tiles apply to fp8 rows against fp8 weights with ``q8_half`` on; int8 weights (whatever the
    rows), and fp8 with it off, keep the ``q8_*`` tiles and fp32 products; a tuned shape entry wins over both."""
    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    monkeypatch.setitem(gemv.TACTICS, "q8_half", 1)
    monkeypatch.setitem(gemv.TACTICS, "h8_block_k", 2048)
    monkeypatch.setitem(gemv.TACTICS, "q8_block_k", 256)
    assert gemv.half_products(fp8, fp8) and not gemv.half_products(bf16, torch.int8)
    assert not gemv.half_products(torch.int8, torch.int8)
    assert gemv.shape_tactics(1, 64, 64, half=True)["block_k"] == 2048
    assert gemv.shape_tactics(1, 64, 64)["block_k"] == 256
    monkeypatch.setitem(gemv.TACTICS, "per_shape", {"64x64": {"block_k": 512, "stages": 3}})
    assert gemv.shape_tactics(1, 64, 64, half=True)["block_k"] == 512
    monkeypatch.setitem(gemv.TACTICS, "q8_half", 0)
    assert not gemv.half_products(fp8, fp8)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 11008)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_fp8_f16_products_llama_shapes_gpu(n, k, m, monkeypatch):
    """Llama-2-7B's QKV and down projection (K ragged for 1,024-wide tiles) in fp8 at the f16 products'
    default tiles, up to 4 rows: within 1e-3 of the largest output of the fp32 products on the same rows."""
    from llmc.plugins.act_quant import quantize_rows

    monkeypatch.setitem(gemv.TACTICS, "q8_max_m", 4)
    g = torch.Generator(device="cuda").manual_seed(n + m)
    rows = quantize_rows(torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16), "fp8", None)
    w = (torch.randn(n, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(n, device="cuda", generator=g) * 1e-3
    outs = []
    for half in (0, 1):
        monkeypatch.setitem(gemv.TACTICS, "q8_half", half)
        outs.append(gemv.gemv(rows.q, w, None, rows.scale, ws, torch.float32))
    scale = outs[0].abs().max().item()
    torch.testing.assert_close(outs[1], outs[0], atol=1e-3 * scale, rtol=0)


def test_qgemm_quantized_rows_in_bf16(monkeypatch):
    """Pre-quantized fp8 rows (what the fused RMSNorm hands an fp8 linear) in a bf16 model: result in bf16,
    the rows' dtype, and close to the float product."""
    if not CUDA:
        pytest.skip("Triton 3.6's interpreter rounds fp32 -> e4m3 wrongly; checked on the GPU")
    from llmc.plugins.act_quant import quantize_rows

    layer = make_layer("fp8", 512, 96, group=0, bias=False, seed=80)
    x = torch.randn(2, 512, generator=_gen(81)).to(torch.bfloat16)
    rows = quantize_rows(x.to(DEV), "fp8", None)
    p = {name: t.to(DEV) for name, t in layer.named_parameters()}
    out = qg.qgemm(rows, "fp8", p["qweight"], p["scales"])
    assert out.dtype == torch.bfloat16
    ref = layer(x.float())
    assert ((out.float().cpu() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 11008), (32000, 4096)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_llama_shapes_gpu(n, k, m, monkeypatch):
    """Llama-2-7B's QKV, down projection (ragged K for 512-wide tiles) and LM head in bf16, on the tensor
    dispatch the model uses (``ops.linear``), up to the kernel's 4 rows."""
    from llmc.plugins import ops

    monkeypatch.setitem(gemv.TACTICS, "max_m", 4)
    monkeypatch.setitem(gemv.TACTICS, "x_vector", int(m % 2 == 1))  # both activation layouts
    monkeypatch.setitem(gemv.TACTICS, "stages", 3 if m in (1, 4) else 1)  # with and without the pipeline
    monkeypatch.setitem(gemv.TACTICS, "block_n", 16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    out = ops.linear(x, w).float()
    ref = F.linear(x.float(), w.float())
    rel = (out - ref).norm() / ref.norm()
    assert rel < 5e-3, float(rel)


def test_w8a8_rows_stay_on_the_mma_tiling_unless_switched_on(monkeypatch):
    """W8A8's int8 activations make the GEMV slower than the MMA tiling (H200), so one row of a W8A8 linear
    takes the GEMV only when the tuner sets ``w8a8_gemv``; int8 weight-only rows take it by default."""
    calls, real = [], gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(1, 256, generator=_gen(90))
    for method, expected in (("w8a8", 0), ("int8", 1)):
        calls.clear()
        layer = make_layer(method, 256, 40, group=0, bias=False, seed=91)
        torch.testing.assert_close(run_kernel(layer, x), layer(x), atol=2e-4, rtol=1e-4)
        assert len(calls) == expected, method


def test_shape_entries_tuned_before_the_pipeline_keep_the_unpipelined_loop(monkeypatch):
    """An engine tuned before ``stages`` existed stores tiles timed unpipelined: they keep stages 1, while
    shapes without an entry, and entries that name their stages, get what they say."""
    monkeypatch.setitem(gemv.TACTICS, "per_shape", {"64x32": {"block_n": 16}, "32x32": {"block_n": 8, "stages": 3}})
    monkeypatch.setitem(gemv.TACTICS, "stages", 4)
    assert gemv.shape_tactics(2, 64, 32)["stages"] == 1 and gemv.shape_tactics(2, 64, 32)["block_n"] == 16
    assert gemv.shape_tactics(2, 32, 32)["stages"] == 3
    assert gemv.shape_tactics(2, 16, 32)["stages"] == 4
