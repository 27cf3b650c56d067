"""Triton kernels against their CPU references (``plugins/reference.py``) on random inputs.

One test body, two modes: on a CUDA GPU when there is one, else on the CPU under the Triton interpreter
(small shapes; ``TRITON_INTERPRET`` must be set before triton is first imported). Variants marked ``gpu``
use larger, production-like shapes and are skipped without CUDA. The module checked is
``triton_kernels``, what ``ops.py`` dispatches CUDA tensors tk.
"""
from __future__ import annotations

import random

import pytest
import torch

CUDA = torch.cuda.is_available()

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from llmc.plugins import reference  # noqa: E402
from llmc.plugins import triton_kernels as tk  # noqa: E402
from llmc.plugins.act_quant import QuantizedRows  # noqa: E402
from llmc.plugins.kv_layout import allocate_kv_cache, as_bytes  # noqa: E402
from llmc.plugins.metadata import AttentionMetadata  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def tactics(monkeypatch):
    """Override ``triton_kernels.TACTICS`` entries for one test (restored afterwards)."""
    def set_(**kw):
        for k, v in kw.items():
            assert k in tk.TACTICS, k
            monkeypatch.setitem(tk.TACTICS, k, v)
    return set_


def rnd(*shape, g, dtype=torch.float32):
    """Random normal values, never all zeros, made on the CPU (same draws in both modes)."""
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def make_batch(q_lens, ctx_lens, hq, hkv, d, page, dtype, seed, cache_dtype=None):
    """Random q, random caches, and scrambled block tables (spare blocks included) for these shapes."""
    g = torch.Generator().manual_seed(seed)
    total_blocks = sum(-(-c // page) for c in ctx_lens) + 3
    perm = torch.randperm(total_blocks, generator=g).tolist()
    tables, used = [], 0
    for c in ctx_lens:
        nb = -(-c // page)
        tables.append(perm[used:used + nb])
        used += nb
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, page, DEV)
    q = rnd(sum(q_lens), hq, d, g=g, dtype=dtype)
    kc = rnd(total_blocks, page, hkv, d, g=g, dtype=cache_dtype or dtype)
    vc = rnd(total_blocks, page, hkv, d, g=g, dtype=cache_dtype or dtype)
    return q, kc, vc, meta


def check_attention(fn, q, kc, vc, meta, tol=None):
    scale = q.shape[-1] ** -0.5
    ref = reference.paged_attention(q.float(), kc.float(), vc.float(), meta, scale)
    out = fn(q, kc, vc, meta, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = tol or max(TOL[q.dtype], TOL[kc.dtype])
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


# (q_lens, ctx_lens, hq, hkv, page): odd lengths, contexts crossing pages, GQA 1 / 3 / 4, pages 16 / 32
CASES = {
    "decode-mha": ([1, 1, 1], [1, 17, 40], 4, 4, 16),
    "decode-gqa3": ([1, 1], [33, 64], 6, 2, 16),
    "decode-gqa4-page32": ([1, 1, 1, 1], [5, 100, 16, 31], 8, 2, 32),
    "prefill-no-prefix": ([33, 17, 2], [33, 17, 2], 4, 4, 16),
    "mixed-gqa4": ([7, 1, 12, 1], [7, 20, 40, 3], 4, 1, 16),
    "mixed-gqa3-page32": ([5, 1, 19, 1, 2], [5, 50, 37, 1, 40], 6, 2, 32),
    "prefill-long-prefix-gqa4": ([70, 1, 33], [100, 9, 33], 8, 2, 32),
}
SMALL_TILES = dict(prefill_block_m=16, prefill_block_n=16, decode_block_n=16)


@pytest.mark.parametrize("case", CASES)
def test_paged_attention_fp32(case, tactics):
    tactics(**SMALL_TILES)  # many tiles per sequence: tile and page boundaries cross
    q_lens, ctx, hq, hkv, page = CASES[case]
    q, kc, vc, meta = make_batch(q_lens, ctx, hq, hkv, 64, page, torch.float32, seed=len(case))
    check_attention(tk.paged_attention, q, kc, vc, meta)


@pytest.mark.parametrize("case", ["decode-gqa3", "mixed-gqa3-page32", "prefill-long-prefix-gqa4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_16bit(case, dtype, tactics):
    tactics(prefill_block_m=32, prefill_block_n=32, decode_block_n=32)
    q_lens, ctx, hq, hkv, page = CASES[case]
    q, kc, vc, meta = make_batch(q_lens, ctx, hq, hkv, 64, page, dtype, seed=3)
    check_attention(tk.paged_attention, q, kc, vc, meta)


def test_paged_attention_default_tactics_and_mixed_dtypes():
    """Default (GPU-sized) tiles, and an fp32 query over a bf16 cache (fp32 math)."""
    q, kc, vc, meta = make_batch([40, 1, 3], [90, 33, 3], 6, 2, 64, 16, torch.float32, seed=11,
                                 cache_dtype=torch.bfloat16)
    check_attention(tk.paged_attention, q, kc, vc, meta, tol=1e-4)


@pytest.mark.parametrize("seed", range(24))
def test_paged_attention_random_batches(seed, tactics):
    """Random mixes of decode, chunked prefill with cached prefixes, and fresh prefill; random GQA, page,
    head_dim and tile sizes (forced split counts included)."""
    r = random.Random(seed)
    group = r.choice([1, 2, 3, 4, 8])
    hkv = r.choice([1, 2])
    page = r.choice([16, 32])
    d = r.choice([32, 64, 128]) if CUDA or seed % 3 else 16
    q_lens, ctx = [], []
    for _ in range(r.randint(1, 5)):
        kind = r.choice(["decode", "chunk", "fresh"])
        c = r.randint(1, 150)
        ql = 1 if kind == "decode" else (c if kind == "fresh" else r.randint(1, c))
        q_lens.append(ql)
        ctx.append(c)
    tactics(prefill_block_m=r.choice([16, 32, 64]), prefill_block_n=r.choice([16, 32, 64]),
            decode_block_n=r.choice([16, 32, 64]), decode_num_splits=r.choice([0, 1, 2, 5]),
            decode_use_dot=r.choice([0, 1]), decode_num_stages=r.choice([1, 2, 3]))
    dtype = torch.float32 if seed % 2 == 0 else torch.float16
    q, kc, vc, meta = make_batch(q_lens, ctx, hkv * group, hkv, d, page, dtype, seed=seed)
    check_attention(tk.paged_attention, q, kc, vc, meta)


@pytest.mark.parametrize("use_dot", [0, 1])
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_decode_splits_agree(splits, use_dot, tactics):
    """Long contexts cut into several splits (some empty for the shorter sequence) merge exactly."""
    tactics(decode_use_dot=use_dot, decode_block_n=32)
    q, kc, vc, meta = make_batch([1, 1, 1], [300, 257, 20], 6, 2, 64, 16, torch.float32, seed=7)
    ref = reference.paged_attention(q, kc, vc, meta, 0.125)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    tk.paged_decode(q, kc, vc, meta, 0.125, out, decode_only=True, num_splits=splits)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_decode_split_heuristic(tactics):
    """Few long sequences get many splits (fill the SMs); many sequences or short contexts get few."""
    assert tk.decode_num_splits(1, 8, 8192) >= 32
    assert tk.decode_num_splits(64, 32, 4096) == 1
    assert tk.decode_num_splits(1, 8, 100) == 1
    tactics(decode_num_splits=5)
    assert tk.decode_num_splits(64, 32, 4096) == 5


def test_mixed_batch_with_split_decode_rows(tactics):
    """Decode rows of a mixed batch go through the split decode kernel (+ merge); prefill rows elsewhere."""
    tactics(decode_num_splits=3, prefill_block_m=16, prefill_block_n=32, decode_block_n=16)
    q, kc, vc, meta = make_batch([1, 9, 1, 20], [130, 40, 77, 60], 8, 2, 64, 16, torch.float32, seed=5)
    check_attention(tk.paged_attention, q, kc, vc, meta)


def test_prefill_kernel_covers_every_row_alone(tactics):
    """Without the decode kernel, the tiled kernel itself must handle one-token rows and write all rows."""
    tactics(prefill_block_m=16, prefill_block_n=16)
    q, kc, vc, meta = make_batch([1, 17, 1, 16, 3], [9, 40, 1, 16, 35], 4, 4, 64, 16, torch.float32, seed=9)
    ref = reference.paged_attention(q, kc, vc, meta, 0.3)
    out = torch.full_like(q, float("nan"))
    tk.paged_prefill(q, kc, vc, meta, 0.3, out, skip_decode=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("page", [16, 32])
def test_write_kv_matches_reference_and_skips_padding(page):
    g = torch.Generator().manual_seed(3)
    T, H, D, nb = 9, 3, 64, 6
    qkv = rnd(T, 4 * H * D, g=g)
    k = qkv[:, : H * D].reshape(T, H, D)  # strided views, as the model passes them
    v = qkv[:, H * D: 2 * H * D].reshape(T, H, D)
    slots = random.Random(page).sample(range(nb * page), T)
    slots[4] = -1
    slot_t = torch.tensor(slots, device=DEV)
    for cache_dtype in (torch.float32, torch.bfloat16):
        kc, vc = rnd(nb, page, H, D, g=g, dtype=cache_dtype), rnd(nb, page, H, D, g=g, dtype=cache_dtype)
        kr, vr = kc.clone(), vc.clone()
        reference.write_kv(k, v, kr, vr, slot_t)
        tk.write_kv(k, v, kc, vc, slot_t)
        # exact, except that the CPU interpreter rounds fp32 -> bf16 differently from torch (by one ulp)
        tol = dict(atol=0, rtol=0) if CUDA or cache_dtype == k.dtype else dict(atol=0, rtol=1e-2)
        torch.testing.assert_close(kc, kr, **tol)
        torch.testing.assert_close(vc, vr, **tol)


def test_write_then_attend_roundtrip(tactics):
    """The engine's order: write the new tokens' K/V, then attend over cached prefix + new tokens."""
    tactics(**SMALL_TILES)
    q_lens, ctx, hq, hkv, page = [6, 1, 3], [22, 31, 3], 6, 2, 16
    q, kc, vc, meta = make_batch(q_lens, ctx, hq, hkv, 64, page, torch.float32, seed=21)
    g = torch.Generator().manual_seed(22)
    k_new, v_new = rnd(sum(q_lens), hkv, 64, g=g), rnd(sum(q_lens), hkv, 64, g=g)
    kr, vr = kc.clone(), vc.clone()
    reference.write_kv(k_new, v_new, kr, vr, meta.slot_mapping)
    tk.write_kv(k_new, v_new, kc, vc, meta.slot_mapping)
    torch.testing.assert_close(kc, kr, atol=0, rtol=0)
    check_attention(tk.paged_attention, q, kc, vc, meta)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_small_fused_ops_match_reference(dtype):
    m = tk
    g = torch.Generator().manual_seed(5)
    T, H = 7, 96
    x = rnd(T, H, g=g, dtype=dtype)
    r = rnd(T, H, g=g, dtype=dtype)
    w = rnd(H, g=g, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(m.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), **tol)
    x3 = x.reshape(1, T, H)
    torch.testing.assert_close(m.rms_norm(x3, w, 1e-6), reference.rms_norm(x3, w, 1e-6), **tol)
    x_before, r_before = x.clone(), r.clone()
    for got, want in zip(m.fused_add_rms_norm(x, r, w, 1e-5), reference.fused_add_rms_norm(x, r, w, 1e-5)):
        torch.testing.assert_close(got, want, **tol)
    assert torch.equal(x, x_before) and torch.equal(r, r_before)  # inputs untouched
    for inter in (80, 1100):  # non power of two; more than one 1024-wide block
        gu = rnd(T, 2 * inter, g=g, dtype=dtype)
        torch.testing.assert_close(m.silu_and_mul(gu), reference.silu_and_mul(gu), **tol)
    # rope on strided q/k views of a fused qkv, as the model calls it; GQA 3
    hq, hk, d = 6, 2, 64
    qkv = rnd(T, (hq + 2 * hk) * d, g=g, dtype=dtype)
    q = qkv[:, : hq * d].reshape(T, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].reshape(T, hk, d)
    cs = rnd(64, d, g=g)
    pos = torch.tensor([0, 5, 63, 7, 7, 1, 30], device=DEV)
    for got, want in zip(m.rotary_embedding(pos, q, k, cs), reference.rotary_embedding(pos, q, k, cs)):
        torch.testing.assert_close(got, want, **tol)


def _kv_pools(nb, page, hk, d, cache_dtype):
    """Zeroed caches (+ scale pools for a quantized cache), so untouched slots must stay zero; in the engine's
    layout (1-byte V pages head_dim-major)."""
    quant = cache_dtype in (torch.float8_e4m3fn, torch.int8)
    return list(allocate_kv_cache(nb, page, hk, d, cache_dtype, quant, DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", ["same", "fp8", "int8"])
def test_rope_write_kv_matches_unfused_and_reference(dtype, cache):
    """One launch for RoPE + K/V write: the same bits as ``rotary_embedding`` then ``write_kv`` (these kernels),
    and the reference composition within rounding; padding slots (-1) write nothing; GQA 3, strided views."""
    g = torch.Generator().manual_seed(11)
    T, hq, hk, d, page, nb = 9, 6, 2, 64, 16, 5
    cache_dtype = {"same": dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[cache]
    qkv = rnd(T, (hq + 2 * hk) * d, g=g, dtype=dtype) * 3
    q = qkv[:, : hq * d].reshape(T, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].reshape(T, hk, d)
    v = qkv[:, (hq + hk) * d:].reshape(T, hk, d)
    cs = rnd(64, d, g=g)
    pos = torch.tensor([0, 5, 63, 7, 7, 1, 30, 2, 9], device=DEV)
    slots = torch.tensor([3, 17, -1, 40, 41, 0, 63, -1, 79], device=DEV)
    fused, unfused, want = (_kv_pools(nb, page, hk, d, cache_dtype) for _ in range(3))
    q_fused = tk.rope_write_kv(pos, q, k, v, cs, fused[0], fused[1], slots, fused[2], fused[3])
    q_unfused, k_rot = tk.rotary_embedding(pos, q, k, cs)
    tk.write_kv(k_rot, v, unfused[0], unfused[1], slots, unfused[2], unfused[3])
    q_ref = reference.rope_write_kv(pos, q, k, v, cs, want[0], want[1], slots, want[2], want[3])
    assert torch.equal(q_fused, q_unfused)
    for a, b in zip(fused, unfused):
        if a is not None:
            assert torch.equal(as_bytes(a), as_bytes(b))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(q_fused.float(), q_ref.float(), **tol)
    if want[2] is None:
        torch.testing.assert_close(fused[0].float(), want[0].float(), **tol)
        torch.testing.assert_close(fused[1].float(), want[1].float(), **tol)
    else:  # dequantized rows; bf16 rounding differences may move a value by one 8-bit step
        for c, sc, rc, rs in ((fused[0], fused[2], want[0], want[2]), (fused[1], fused[3], want[1], want[3])):
            torch.testing.assert_close(sc, rs, atol=1e-6, rtol=2e-2)
            slack = 1.05 if dtype == torch.float32 else 2.0  # bf16: the rotated k may differ by an ulp
            step = torch.maximum(sc, rs)[..., None] * (1.0 if cache == "int8" else 32.0) * slack
            assert ((c.float() * sc[..., None] - rc.float() * rs[..., None]).abs() <= step + 1e-6).all()
    written = torch.zeros(nb * page, dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    assert (fused[0].float().reshape(nb * page, -1)[~written.to(DEV)] == 0).all()
    assert (fused[0].float().reshape(nb * page, -1)[written.to(DEV)] != 0).any()


def _check_quantized_rows(got, want, method):
    """Dequantized rows agree within one 8-bit step, two in bf16 (whose rounding of the 16-bit row may
    differ by an ulp from torch's under the interpreter)."""
    assert got.q.dtype == want.q.dtype and got.dtype == want.dtype
    torch.testing.assert_close(got.scale, want.scale, atol=1e-9, rtol=2e-2)
    gd = got.q.float() * got.scale[:, None]
    wd = want.q.float() * want.scale[:, None]
    slack = 1.05 if got.dtype == torch.float32 else 2.0
    step = torch.maximum(got.scale, want.scale)[:, None] * (1.0 if method == "w8a8" else 32.0) * slack
    assert ((gd - wd).abs() <= step + 1e-6).all()
    assert (got.q.float() == want.q.float()).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["fp8", "w8a8"])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantizing_producers_match_unfused_and_reference(dtype, method, smooth):
    """RMSNorm (with and without the residual add) and SwiGLU writing the per-token quantized rows of an
    fp8/w8a8 linear: the same bits as the op followed by ``quantize_activations``, near the reference."""
    from llmc.plugins import quant_gemm as qg

    g = torch.Generator().manual_seed(6)
    T, H, inter = 7, 96, 1100  # the SwiGLU row spans more than one 1024-wide block
    x, r = rnd(T, H, g=g, dtype=dtype) * 2, rnd(T, H, g=g, dtype=dtype)
    w = rnd(H, g=g, dtype=dtype)
    isc = (torch.rand(H, generator=g) + 0.5).to(DEV) if smooth else None
    gu = rnd(T, 2 * inter, g=g, dtype=dtype)
    isc_i = (torch.rand(inter, generator=g) + 0.5).to(DEV) if smooth else None

    got = tk.rms_norm_quant(x, w, 1e-5, method, isc)
    unf = qg.quantize_activations(tk.rms_norm(x, w, 1e-5), method, isc)
    assert torch.equal(as_bytes(got.q), as_bytes(unf[0])) and torch.equal(got.scale, unf[1])
    _check_quantized_rows(got, reference.rms_norm_quant(x, w, 1e-5, method, isc), method)

    got, res = tk.fused_add_rms_norm_quant(x, r, w, 1e-5, method, isc)
    normed, res_unf = tk.fused_add_rms_norm(x, r, w, 1e-5)
    unf = qg.quantize_activations(normed, method, isc)
    assert torch.equal(as_bytes(got.q), as_bytes(unf[0])) and torch.equal(got.scale, unf[1]) and torch.equal(res, res_unf)
    want, res_ref = reference.fused_add_rms_norm_quant(x, r, w, 1e-5, method, isc)
    _check_quantized_rows(got, want, method)
    torch.testing.assert_close(res, res_ref, atol=TOL[dtype], rtol=TOL[dtype])

    wide = rnd(3, 2 * 17000, g=g, dtype=dtype)  # wider than one register-resident row: the two-pass loop
    for gu, isc_i in ((gu, isc_i), (wide, None)):
        got = tk.silu_and_mul_quant(gu, method, isc_i)
        unf = qg.quantize_activations(tk.silu_and_mul(gu), method, isc_i)
        if CUDA:
            assert torch.equal(as_bytes(got.q), as_bytes(unf[0])) and torch.equal(got.scale, unf[1])
        else:  # the interpreter's exp (numpy) may differ by an ulp between the two kernels' block shapes
            _check_quantized_rows(got, QuantizedRows(*unf, gu.dtype), method)
        _check_quantized_rows(got, reference.silu_and_mul_quant(gu, method, isc_i), method)


# ---------------------------------------------------------------------------- GPU-only, larger shapes
GPU_CASES = {  # Llama-like: head_dim 128, GQA 1 / 4 / 8, contexts of thousands of tokens
    "decode-b32-gqa8": ([1] * 32, [random.Random(i).randint(1, 3000) for i in range(32)], 32, 4, 16),
    "decode-b2-long-gqa1": ([1, 1], [8191, 4000], 32, 32, 16),
    "prefill-2x1500-gqa4": ([1500, 777], [1500, 2000], 32, 8, 16),
    "mixed-gqa4-page32": ([300, 1, 1, 129, 1], [1800, 4000, 17, 129, 900], 32, 8, 32),
}


@gpu
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_paged_attention_large_gpu(case, dtype):
    q_lens, ctx, hq, hkv, page = GPU_CASES[case]
    q, kc, vc, meta = make_batch(q_lens, ctx, hq, hkv, 128, page, dtype, seed=1)
    check_attention(tk.paged_attention, q, kc, vc, meta)


@gpu
@pytest.mark.parametrize("d", [64, 256])
def test_paged_attention_head_dims_gpu(d):
    q, kc, vc, meta = make_batch([200, 1, 1], [700, 513, 64], 12, 4, d, 16, torch.bfloat16, seed=2)
    check_attention(tk.paged_attention, q, kc, vc, meta)


@gpu
def test_decode_cuda_graph_replay_gpu():
    """The decode path launches from host ints only, so a captured graph replays with new lengths."""
    ctx = [900, 33, 2047, 5]
    q, kc, vc, meta = make_batch([1] * 4, ctx, 16, 4, 128, 16, torch.bfloat16, seed=4)
    meta.max_seq_len = 2048  # the engine captures with its max_seq_len
    tk.paged_attention(q, kc, vc, meta, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tk.paged_attention(q, kc, vc, meta, 0.1)
    new = [17, 2048, 1, 1500]
    meta.seq_lens.copy_(torch.tensor(new, dtype=torch.int32))
    meta.seq_lens_cpu = new
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.paged_attention(q.float(), kc.float(), vc.float(), meta, 0.1)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@gpu
def test_small_ops_large_gpu():
    m = tk
    g = torch.Generator().manual_seed(0)
    x, r = rnd(300, 8192, g=g, dtype=torch.bfloat16), rnd(300, 8192, g=g, dtype=torch.bfloat16)
    w = rnd(8192, g=g, dtype=torch.bfloat16)
    tol = dict(atol=2e-2, rtol=2e-2)
    for got, want in zip(m.fused_add_rms_norm(x, r, w, 1e-5), reference.fused_add_rms_norm(x, r, w, 1e-5)):
        torch.testing.assert_close(got, want, **tol)
    gu = rnd(300, 2 * 11008, g=g, dtype=torch.bfloat16)
    torch.testing.assert_close(m.silu_and_mul(gu), reference.silu_and_mul(gu), **tol)
    from llmc.plugins import quant_gemm as qg

    for method in ("fp8", "w8a8"):  # Llama-2-7B widths: fused producers against the unfused kernels
        got, _ = m.fused_add_rms_norm_quant(x, r, w, 1e-5, method)
        unf = qg.quantize_activations(m.fused_add_rms_norm(x, r, w, 1e-5)[0], method, None)
        _check_quantized_rows(got, QuantizedRows(*unf, x.dtype), method)
        got = m.silu_and_mul_quant(gu, method)
        unf = qg.quantize_activations(m.silu_and_mul(gu), method, None)
        _check_quantized_rows(got, QuantizedRows(*unf, gu.dtype), method)
    hq, hk, d, page = 32, 8, 128, 16
    qkv = rnd(300, (hq + 2 * hk) * d, g=g, dtype=torch.bfloat16)
    q, k, v = qkv[:, :hq * d].reshape(300, hq, d), qkv[:, hq * d:(hq + hk) * d].reshape(300, hk, d), \
        qkv[:, (hq + hk) * d:].reshape(300, hk, d)
    cs = rnd(4096, d, g=g)
    pos = torch.randint(0, 4096, (300,), generator=g).to(DEV)
    slots = torch.randperm(40 * page, generator=g)[:300].to(DEV)
    for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        fused, unfused = _kv_pools(40, page, hk, d, cache_dtype), _kv_pools(40, page, hk, d, cache_dtype)
        qf = m.rope_write_kv(pos, q, k, v, cs, *fused[:2], slots, *fused[2:])
        qu, kr = m.rotary_embedding(pos, q, k, cs)
        m.write_kv(kr, v, *unfused[:2], slots, *unfused[2:])
        assert torch.equal(qf, qu)
        assert all(torch.equal(as_bytes(a), as_bytes(b)) for a, b in zip(fused, unfused) if a is not None)


def test_every_kernel_waits_for_the_previous_one_under_pdl():
    """Kernels launch with programmatic dependent launch on Hopper (``triton_compat.pdl_args``), so each may
    start before its predecessor ends: every one must take the ``PDL`` switch and call ``pdl_wait`` before
    its first read of an earlier kernel's output. A new kernel that forgets would race."""
    import inspect

    from llmc.plugins import gemv
    from llmc.plugins import quant_gemm as qg

    kernels = {f"{m.__name__}.{name}": getattr(obj, "fn", obj) for m in (tk, qg, gemv)
               for name, obj in vars(m).items() if name.endswith("_kernel") and hasattr(obj, "fn")}
    assert len(kernels) >= 14
    for name, fn in kernels.items():
        src = inspect.getsource(fn)
        assert "PDL: tl.constexpr" in src and "pdl_wait(PDL)" in src, name
