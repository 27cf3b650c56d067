"""Quantized paged KV cache (``llmc build --kv-cache-dtype fp8|int8``): the reference quantizer's error
bounds, the Triton write/decode/prefill kernels against the reference (under the Triton interpreter on a
CPU, on the GPU when there is one), tiny engines against the unquantized engine, cache capacity, and
copy-on-write of the scales."""
from __future__ import annotations

import random

import pytest
import torch

CUDA = torch.cuda.is_available()

from llmc import LLM, SamplingParams  # noqa: E402
from llmc.build.builder import build  # noqa: E402
from llmc.build.engine import load_engine  # noqa: E402
from llmc.config import BuildConfig, ModelConfig  # noqa: E402
from llmc.errors import ConfigError  # noqa: E402
from llmc.plugins import reference  # noqa: E402
from llmc.plugins.kv_layout import KVCache, allocate_kv_cache, as_bytes, kv_storage_dtype, v_cache_layout  # noqa: E402
from llmc.plugins.metadata import AttentionMetadata  # noqa: E402
from llmc.runtime.model_runner import ModelRunner, ScheduledSeq, kv_bytes_per_block  # noqa: E402
from llmc.runtime.sequence import Sequence  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
FP8, INT8 = torch.float8_e4m3fn, torch.int8
KV_DTYPES = [FP8, INT8]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def tk():
    """The Triton module (skips the test where triton is not installed)."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
    from llmc.plugins import triton_kernels

    return triton_kernels


def step_bound(ref: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One quantization step at each dequantized value: what a last-ulp difference in ``x / scale`` (the
    GPU divides approximately) can move a value by."""
    s = scale[..., None]
    if dtype == INT8:
        return s * 1.001
    return torch.maximum(ref.abs() * 0.125, s * 2.0 ** -9) * 1.001


# ---------------------------------------------------------------------------- (1) reference round trip
@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_quantize_round_trip_error_bounds(dtype):
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes, a few outlier channels, one all-zero row
    x = torch.randn(300, 8, 128, generator=g) * torch.exp(3 * torch.randn(300, 8, 1, generator=g))
    x[::7, :, 5] *= 40
    x[3, 2] = 0
    q, s = reference.quantize_kv(x, dtype)
    assert q.dtype == dtype and s.dtype == torch.float32 and s.shape == x.shape[:-1]
    back = reference.dequantize_kv(q, s)
    assert torch.isfinite(back).all() and torch.equal(back[3, 2], torch.zeros(128))
    err = (back - x).abs()
    amax = x.abs().amax(-1, keepdim=True)
    if dtype == INT8:  # round to nearest on a grid of amax / 127
        bound = amax / 127 / 2
    else:  # e4m3: 3 mantissa bits (half ulp = 2^-4 relative), subnormal grid 2^-9 below 2^-6 (x amax/448)
        bound = torch.maximum(x.abs() * 2.0 ** -4, amax / 448 * 2.0 ** -10)
    assert (err <= bound * (1 + 1e-5) + 1e-30).all()
    # the largest element of each row is kept (it maps to +-qmax)
    idx = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(back.gather(-1, idx), x.gather(-1, idx), rtol=1e-6, atol=0)
    # typical relative error on unit-normal rows (measured: int8 0.0065, fp8 0.026)
    y = torch.randn(1000, 128, generator=g)
    rel = ((reference.dequantize_kv(*reference.quantize_kv(y, dtype)) - y).norm() / y.norm()).item()
    assert rel < (0.008 if dtype == INT8 else 0.03), rel


def test_kv_storage_dtype_and_fp8_needs_ada_or_hopper(monkeypatch):
    from llmc.config import KV_CACHE_DTYPES  # the CLI's choices (torch-free) name exactly the storage formats
    from llmc.plugins.kv_layout import KV_QUANT_DTYPES

    assert set(KV_CACHE_DTYPES) == {"auto", *KV_QUANT_DTYPES}
    assert kv_storage_dtype("auto", "cpu") is None
    assert kv_storage_dtype("fp8", "cpu") == FP8 and kv_storage_dtype("int8", "cpu") == INT8
    with pytest.raises(ConfigError, match="auto, fp8, int8"):
        kv_storage_dtype("fp4", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match="compute capability 8.9.*--kv-cache-dtype int8"):
        kv_storage_dtype("fp8", "cuda")
    assert kv_storage_dtype("int8", "cuda") == INT8


# ---------------------------------------------------------------------------- (2) Triton vs reference
def make_batch(q_lens, ctx_lens, hq, hkv, d, page, q_dtype, kv_dtype, seed, v_rowmajor=False):
    """Random q and a quantized cache (random K/V of per-token magnitudes quantized by the reference) with
    scrambled block tables and spare blocks; V in the engine's page layout (head_dim-major, ``kv_layout``)
    unless ``v_rowmajor``."""
    g = torch.Generator().manual_seed(seed)
    total_blocks = sum(-(-c // page) for c in ctx_lens) + 3
    perm = torch.randperm(total_blocks, generator=g).tolist()
    tables, used = [], 0
    for c in ctx_lens:
        nb = -(-c // page)
        tables.append(perm[used:used + nb])
        used += nb
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, page, DEV)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(DEV, q_dtype)
    shape = (total_blocks, page, hkv, d)
    k = torch.randn(*shape, generator=g) * torch.exp(0.5 * torch.randn(*shape[:3], 1, generator=g))
    v = torch.randn(*shape, generator=g)
    kq, ks = reference.quantize_kv(k.to(DEV), kv_dtype)
    vq, vs = reference.quantize_kv(v.to(DEV), kv_dtype)
    if not v_rowmajor:
        vq = v_cache_layout(vq)
        assert vq.stride(1) == 1 and vq.stride(3) == page
    return q, KVCache(kq, vq, ks, vs), meta


def check_attention(q, kv: KVCache, meta, tol=None):
    scale = q.shape[-1] ** -0.5
    ref = reference.paged_attention(q.float(), *kv[:2], meta, scale, *kv[2:])
    out = tk().paged_attention(q, kv.k, kv.v, meta, scale, kv.k_scale, kv.v_scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = tol or TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


# (q_lens, ctx_lens, hq, hkv, page): odd lengths, contexts crossing pages and tiles, GQA 1 / 3 / 4
CASES = {
    "decode-gqa3": ([1, 1, 1], [1, 33, 64], 6, 2, 16),
    "prefill-no-prefix-gqa4": ([33, 17, 2], [33, 17, 2], 8, 2, 16),
    "mixed-gqa4-page32": ([5, 1, 19, 1, 2], [5, 50, 37, 1, 40], 4, 1, 32),
    "prefill-long-prefix-mha": ([20, 1, 33], [70, 9, 33], 4, 4, 16),
}
SMALL_TILES = dict(prefill_block_m=16, prefill_block_n=16, decode_block_n=16, decode_q8_block_n=16)


@pytest.fixture
def small_tiles(monkeypatch):
    """Many tiles per sequence (tile and page boundaries cross) and a forced split of the decode context."""
    mod = tk()
    for k, v in {**SMALL_TILES, "decode_num_splits": 3}.items():
        monkeypatch.setitem(mod.TACTICS, k, v)


@pytest.mark.parametrize("v_rowmajor", [False, True], ids=["v-paged-dmajor", "v-rowmajor"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_paged_attention_quantized_fp32(case, kv_dtype, v_rowmajor, small_tiles):
    q_lens, ctx, hq, hkv, page = CASES[case]
    q, kv, meta = make_batch(q_lens, ctx, hq, hkv, 32, page, torch.float32, kv_dtype, seed=len(case),
                             v_rowmajor=v_rowmajor)
    check_attention(q, kv, meta)


@pytest.mark.parametrize("v_rowmajor", [False, True], ids=["v-paged-dmajor", "v-rowmajor"])
@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_paged_attention_quantized_16bit(q_dtype, kv_dtype, v_rowmajor, small_tiles):
    """16-bit queries: the dots run in fp16 on the converted K/V (bf16 queries take the fp32 path under the
    interpreter, whose bf16 dots are wrong); V in either page layout."""
    q, kv, meta = make_batch([9, 1, 17, 1], [40, 23, 17, 64], 6, 2, 32, 16, q_dtype, kv_dtype, seed=5,
                             v_rowmajor=v_rowmajor)
    check_attention(q, kv, meta)


def test_bf16_queries_beyond_fp16_range_saturate_not_overflow(small_tiles):
    """A 1-byte cache's dots run in fp16: bf16 queries above 65,504 must clamp, not become inf and NaN."""
    q, kv, meta = make_batch([1, 5], [20, 5], 2, 2, 32, 16, torch.bfloat16, FP8, seed=8)
    q[0, 0, 0] = 1e6
    scale = q.shape[-1] ** -0.5
    out = tk().paged_attention(q, kv.k, kv.v, meta, scale, kv.k_scale, kv.v_scale)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_decode_tile_variants_quantized(stages, q_dtype, kv_dtype, small_tiles, monkeypatch):
    """The tuner's unpipelined (stages 1) and deeper-pipelined decode variants for 1-byte caches (their own
    tactic keys) compute the reference's attention."""
    monkeypatch.setitem(tk().TACTICS, "decode_q8_num_stages", stages)
    monkeypatch.setitem(tk().TACTICS, "decode_q8_block_n", 32)
    monkeypatch.setitem(tk().TACTICS, "decode_block_n", 999)  # the 16-bit tiles must not be what runs
    q, kv, meta = make_batch([1, 1, 1, 1], [40, 23, 17, 64], 6, 2, 32, 16, q_dtype, kv_dtype, seed=11)
    check_attention(q, kv, meta)


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 9, 33]], ids=["decode", "mixed"])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_small_v_keeps_fp16_precision(kv_dtype, q_lens, small_tiles):
    """V of magnitude ~1e-4 under fp16 dots: p * v_scale is below fp16's smallest subnormal (6e-8) for most
    probabilities, so the decode and prefill kernels take the V scales relative to the tile's largest."""
    q, kv, meta = make_batch(q_lens, [64, 150, 33], 4, 4, 32, 16, torch.float16, kv_dtype, seed=3)
    kv = kv._replace(v_scale=kv.v_scale * 1e-4)
    scale = q.shape[-1] ** -0.5
    ref = reference.paged_attention(q.float(), kv.k, kv.v, meta, scale, kv.k_scale, kv.v_scale)
    out = tk().paged_attention(q, kv.k, kv.v, meta, scale, kv.k_scale, kv.v_scale)
    torch.testing.assert_close(out.float() * 1e4, ref * 1e4, atol=TOL[q.dtype], rtol=TOL[q.dtype])


@pytest.mark.parametrize("q_len", [1, 4], ids=["decode", "prefill"])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_stale_nan_rows_of_a_reused_block_do_not_reach_a_new_sequence(kv_dtype, q_len):
    """The head_dim-major V pages are loaded a page-run at a time, so rows past a sequence's end are read
    (and multiplied by probability 0). A block's earlier owner may have written NaN/inf K/V there: the
    writes must store finite values (the scales may be inf/NaN; they are masked per token), so the next
    owner's attention stays finite and equal to the reference over its own rows. (Under the interpreter the
    fp8 store rounds through ``round_e4m3`` first, so the clamp itself is checked on the GPU.)"""
    H, D, P = 2, 32, 16
    kv = allocate_kv_cache(4, P, H, D, kv_dtype, True, DEV)
    bad = torch.full((8, H, D), float("nan"), device=DEV)
    bad[::2] = float("inf")
    tk().write_kv(bad, bad, kv.k, kv.v, torch.arange(2 * P + 8, 2 * P + 16, device=DEV), kv.k_scale, kv.v_scale)
    assert torch.isfinite(kv.v[2, 8:].float()).all() and torch.isfinite(kv.k[2, 8:].float()).all()
    g = torch.Generator().manual_seed(0)
    new = [torch.randn(7, H, D, generator=g).to(DEV) for _ in range(2)]
    tk().write_kv(*new, kv.k, kv.v, torch.arange(2 * P, 2 * P + 7, device=DEV), kv.k_scale, kv.v_scale)
    meta = AttentionMetadata.build([q_len], [7], [[2]], P, DEV)
    q = torch.randn(q_len, H, D, generator=g).to(DEV, torch.float16)
    out = tk().paged_attention(q, kv.k, kv.v, meta, D ** -0.5, kv.k_scale, kv.v_scale)
    ref = reference.paged_attention(q.float(), kv.k, kv.v, meta, D ** -0.5, kv.k_scale, kv.v_scale)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref, atol=TOL[q.dtype], rtol=TOL[q.dtype])


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_write_kv_quantized_matches_reference(kv_dtype):
    mod = tk()
    g = torch.Generator().manual_seed(3)
    T, H, D, page, nb = 11, 3, 24, 16, 6  # head_dim 24: padded to 32 lanes in the kernel
    qkv = torch.randn(T, 4 * H * D, generator=g) * torch.exp(torch.randn(T, 1, generator=g))
    qkv[2] = 0  # an all-zero token
    qkv = qkv.to(DEV)
    k = qkv[:, : H * D].reshape(T, H, D)  # strided views, as the model passes them
    v = qkv[:, H * D: 2 * H * D].reshape(T, H, D)
    slots = random.Random(1).sample(range(nb * page), T)
    slots[4] = -1  # CUDA-graph padding: writes nothing
    slot_t = torch.tensor(slots, device=DEV)
    init = [reference.quantize_kv(torch.randn(nb, page, H, D, generator=g).to(DEV), kv_dtype) for _ in range(2)]
    ref = KVCache(init[0][0].clone(), v_cache_layout(init[1][0]), init[0][1].clone(), init[1][1].clone())
    out = KVCache(*(t.clone() for t in ref))
    assert out.v.stride() == allocate_kv_cache(nb, page, H, D, kv_dtype, True, "cpu").v.stride() == (
        H * D * page, 1, D * page, page)  # the engine's head_dim-major V pages, kept by clone
    reference.write_kv(k, v, *ref[:2], slot_t, *ref[2:])
    mod.write_kv(k, v, *out[:2], slot_t, *out[2:])
    for cache, sc, rcache, rsc in ((out.k, out.k_scale, ref.k, ref.k_scale), (out.v, out.v_scale, ref.v, ref.v_scale)):
        torch.testing.assert_close(sc, rsc, rtol=1e-6, atol=0)
        got, want = reference.dequantize_kv(cache, sc), reference.dequantize_kv(rcache, rsc)
        assert ((got - want).abs() <= step_bound(want, rsc, kv_dtype)).all()
        same = (as_bytes(cache) == as_bytes(rcache)).float().mean().item()
        assert same == 1.0 if not CUDA else same > 0.99, same  # the interpreter divides exactly, as torch
    assert torch.equal(ref.k_scale.view(-1, H)[slots[2]], torch.full((H,), 1e-12, device=DEV))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_write_then_attend_quantized(kv_dtype, small_tiles):
    """The engine's order, through the Triton kernels only: write the new tokens (quantizing), then attend
    over the quantized prefix + new tokens; against the reference doing the same."""
    mod = tk()
    q_lens, ctx, hq, hkv, page = [6, 1, 3, 1], [22, 31, 3, 16], 6, 2, 16
    q, kv, meta = make_batch(q_lens, ctx, hq, hkv, 32, page, torch.float32, kv_dtype, seed=21)
    g = torch.Generator().manual_seed(22)
    k_new = torch.randn(sum(q_lens), hkv, 32, generator=g).to(DEV)
    v_new = torch.randn(sum(q_lens), hkv, 32, generator=g).to(DEV)
    ref = KVCache(*(t.clone() for t in kv))
    reference.write_kv(k_new, v_new, *ref[:2], meta.slot_mapping, *ref[2:])
    mod.write_kv(k_new, v_new, *kv[:2], meta.slot_mapping, *kv[2:])
    scale = 32 ** -0.5
    want = reference.paged_attention(q, *ref[:2], meta, scale, *ref[2:])
    got = mod.paged_attention(q, *kv[:2], meta, scale, *kv[2:])
    tol = 1e-4 if not CUDA else 2e-2  # GPU: a last-ulp division can move a value by one step
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------- (3) tiny engines
@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory):
    """One tiny random Llama (GQA 2, head_dim 16) built three times: kv cache auto, int8, fp8."""
    from llmc.convert import convert
    from tests.conftest import make_tiny_hf

    root = tmp_path_factory.mktemp("tiny-kvq")
    ck = convert(str(make_tiny_hf("llama-gqa", root / "hf")), root / "ckpt", dtype="float32")
    return {kd: build(ck, root / f"engine-{kd}", BuildConfig(max_batch_size=8, max_seq_len=256, max_num_tokens=64,
                                                            kv_cache_dtype=kd))
            for kd in ("auto", "int8", "fp8")}


def prefill_then_decode_logits(engine_dir, prompt: list[int], steps: int, follow: list[int] | None = None,
                               chunk: int = 13, device: str = "cpu", dtype: str | None = None):
    """Logits of every prompt position (chunked prefill, scrambled blocks) and of ``steps`` decode steps,
    and the greedy token of each step; decode feeds ``follow`` when given (teacher forcing, so that two
    engines' logits stay comparable after a near-tie), else the greedy tokens. On CUDA, decode steps
    replay CUDA graphs."""
    eng = load_engine(engine_dir)
    r = ModelRunner(eng, device=device, dtype=dtype, show_progress=False, num_kv_blocks=40,
                    cuda_graph_batch_sizes=None if device == "cuda" else [])
    assert r.kv_quantized == (eng.build.kv_cache_dtype != "auto") and (device == "cpu" or r.graphs is not None)
    seq = Sequence("t", list(prompt), SamplingParams())
    seq.block_table = random.Random(0).sample(range(40), 16)
    outs, greedy = [], []
    while seq.num_computed_tokens < len(prompt):
        n = min(chunk, len(prompt) - seq.num_computed_tokens)
        outs.append(r.forward([ScheduledSeq(seq, n, True)], logit_rows=list(range(n))))
        seq.num_computed_tokens += n
    for i in range(steps):
        greedy.append(int(outs[-1][-1].argmax()))
        seq.append_token(follow[i] if follow is not None else greedy[-1])
        outs.append(r.forward([ScheduledSeq(seq, 1, True)]).cpu())  # a graph's logits live in a static buffer
        seq.num_computed_tokens += 1
    return torch.cat([o.cpu() for o in outs]), greedy


# Max |logit| difference against the auto-dtype engine on this model (logits span about +-5), over a
# 45-token chunked prefill and 8 decode steps, measured on three prompts: int8 0.028-0.059, fp8 0.21-0.28
# (0.036 and 0.275 on the prompt below). The tiny model's head_dim is 16 and its random weights (std 0.2)
# amplify errors; fp8 keeps 3 mantissa bits (rms error 2.6% per element against int8's 0.65%), hence
# the ~7x gap. Tolerances: 2x the measurement on this prompt.
LOGIT_ATOL = {"int8": 0.075, "fp8": 0.55}


@pytest.mark.parametrize("kd", ["int8", "fp8"])
def test_tiny_engine_logits_close_and_greedy_equal(tiny_engines, kd):
    assert load_engine(tiny_engines[kd]).build.kv_cache_dtype == kd
    prompt = [random.Random(2).randrange(3, 384) for _ in range(45)]  # crosses blocks, odd length
    want, want_tokens = prefill_then_decode_logits(tiny_engines["auto"], prompt, 8)
    got, got_tokens = prefill_then_decode_logits(tiny_engines[kd], prompt, 8, follow=want_tokens)
    diff = (got - want).abs().max().item()
    assert 0 < diff < LOGIT_ATOL[kd], diff  # > 0: the cache really is quantized
    # Greedy tokens agree wherever the unquantized engine's top-2 margin exceeds twice the logit error (a
    # closer call may flip either way, as happens on other prompts); here the margins are 0.95 .. 0.15,
    # so that is all 8 steps for int8 and the first 6 for fp8.
    top2 = want[-9:-1].topk(2, dim=-1).values
    clear = [i for i, m in enumerate((top2[:, 0] - top2[:, 1]).tolist()) if m > 2 * diff]
    assert len(clear) >= 6
    assert [got_tokens[i] for i in clear] == [want_tokens[i] for i in clear]
    free_running = prefill_then_decode_logits(tiny_engines[kd], prompt, 6)[1]
    assert free_running == want_tokens[:6]


def test_kv_cache_dtype_overridden_at_load(tiny_engines, tmp_path):
    """``LLMEngine(kv_cache_dtype=...)`` and ``--kv-cache-dtype`` on serve/bench run an engine's weights with
    another cache format: the same tokens as the engine built with that format; a bad value is refused."""
    import json

    from click.testing import CliRunner

    from llmc.cli import main
    from llmc.runtime.engine import LLMEngine

    prompts = [[random.Random(i).randrange(3, 384) for _ in range(20 + 7 * i)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def tokens(llm):
        outs = llm.generate(sampling_params=params, prompt_token_ids=prompts, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    over = LLM(tiny_engines["auto"], device="cpu", kv_cache_dtype="int8", show_progress=False)
    assert over.engine.runner.kv_quantized and over.engine.runner.kv_dtype == torch.int8
    built = LLM(tiny_engines["int8"], device="cpu", show_progress=False)
    plain = LLM(tiny_engines["auto"], device="cpu", show_progress=False)
    assert not plain.engine.runner.kv_quantized
    assert tokens(over) == tokens(built)
    assert len({len(t) for t in tokens(over)}) == 1 and len(tokens(over)[0]) == 12
    with pytest.raises(ConfigError, match="kv-cache-dtype"):
        LLMEngine(tiny_engines["auto"], device="cpu", kv_cache_dtype="fp4", show_progress=False)
    out = tmp_path / "tp.json"
    res = CliRunner().invoke(main, ["bench", "throughput", str(tiny_engines["auto"]), "-n", "3", "--input-len", "9",
                                    "--output-len", "4", "--device", "cpu", "--kv-cache-dtype", "int8",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["engine"]["kv_cache_dtype"] == "int8"


def test_tiny_engine_generate_with_cow_n_samples(tiny_engines):
    """n > 1 forks share the prompt's last partial block and copy it on write: the copy must carry the
    scales, or the forks would attend over zeros and diverge from the single sample."""
    prompt = [random.Random(3).randrange(3, 384) for _ in range(21)]  # 21: the last block is partial
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for kd in ("int8", "fp8"):
        llm = LLM(str(tiny_engines[kd]), show_progress=False)
        one = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs[0].token_ids
        many = llm.generate(prompt_token_ids=[prompt], use_tqdm=False,
                            sampling_params=SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True))
        assert [o.token_ids for o in many[0].outputs] == [one] * 3


def test_copy_blocks_copies_scales(tiny_engines):
    eng = load_engine(tiny_engines["fp8"])
    r = ModelRunner(eng, show_progress=False, cuda_graph_batch_sizes=[], num_kv_blocks=20)
    g = torch.Generator().manual_seed(0)
    for kv in r.kv_caches:
        assert kv.quantized and kv.k.dtype == FP8 and kv.k_scale.shape == kv.k.shape[:3]
        for t in kv:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    before = [[t.clone() for t in kv] for kv in r.kv_caches]
    r.copy_blocks([(3, 11), (4, 12)])
    for kv, old in zip(r.kv_caches, before):
        for t, o in zip(kv, old):
            assert torch.equal(as_bytes(t[11]), as_bytes(o[3])) and torch.equal(as_bytes(t[12]), as_bytes(o[4]))
            assert torch.equal(as_bytes(t[3]), as_bytes(o[3]))  # sources untouched
            assert not torch.equal(as_bytes(o[11]), as_bytes(o[3]))  # the copy changed something


# ---------------------------------------------------------------------------- (4) capacity
def test_quantized_cache_holds_about_twice_the_tokens(tiny_engines):
    llama7b = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128)
    bf16 = kv_bytes_per_block(llama7b, 16, torch.bfloat16)
    for dt in KV_DTYPES:
        q = kv_bytes_per_block(llama7b, 16, dt, quantized=True)
        assert bf16 / q == pytest.approx(2 * 128 / (128 + 4))  # 1.94x: one fp32 scale per 128 bytes
    # 60 bf16 blocks: below the runner's cap (max_batch_size x max_seq_len = 128 blocks) for both dtypes
    budget = 60 * kv_bytes_per_block(load_engine(tiny_engines["auto"]).model, 16, torch.bfloat16)
    blocks = {kd: ModelRunner(load_engine(e), dtype="bfloat16", kv_cache_bytes=budget, show_progress=False,
                              cuda_graph_batch_sizes=[]).num_kv_blocks for kd, e in tiny_engines.items()}
    assert blocks["auto"] == 60
    head_dim = load_engine(tiny_engines["auto"]).model.head_dim  # 16: scales weigh 4 bytes per 16 here
    for kd in ("int8", "fp8"):
        assert blocks[kd] == int(60 * 2 * head_dim / (head_dim + 4))  # 96: 1.6x


def test_cli_build_fp8_and_info(tiny_engines, tmp_path):
    from click.testing import CliRunner

    from llmc.cli import main

    ck = tiny_engines["auto"].parent / "ckpt"
    res = CliRunner().invoke(main, ["build", str(ck), "-o", str(tmp_path / "e"), "--max-seq-len", "128",
                                    "--max-batch-size", "4", "--max-num-tokens", "32", "--kv-cache-dtype", "fp8"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "fp8, block 16" in CliRunner().invoke(main, ["info", str(tmp_path / "e")]).output


# ---------------------------------------------------------------------------- GPU, larger shapes
GPU_CASES = {  # Llama-like: head_dim 128, GQA 1 / 4 / 8, contexts of thousands of tokens
    "decode-b32-gqa8": ([1] * 32, [random.Random(i).randint(1, 3000) for i in range(32)], 32, 4, 16),
    "prefill-2x1500-gqa4": ([1500, 777], [1500, 2000], 32, 8, 16),
    "mixed-gqa1-page32": ([300, 1, 1, 129, 1], [1800, 4000, 17, 129, 900], 16, 16, 32),
}


@gpu
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_paged_attention_quantized_large_gpu(case, q_dtype, kv_dtype):
    q_lens, ctx, hq, hkv, page = GPU_CASES[case]
    q, kv, meta = make_batch(q_lens, ctx, hq, hkv, 128, page, q_dtype, kv_dtype, seed=1)
    check_attention(q, kv, meta)


@gpu
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_write_kv_quantized_large_gpu(kv_dtype):
    g = torch.Generator().manual_seed(4)
    T, H, D, page, nb = 3000, 8, 128, 16, 400
    k = (torch.randn(T, H, D, generator=g) * torch.exp(torch.randn(T, H, 1, generator=g))).to(DEV, torch.bfloat16)
    v = torch.randn(T, H, D, generator=g).to(DEV, torch.bfloat16)
    slots = torch.tensor(random.Random(2).sample(range(nb * page), T), device=DEV)
    mk = lambda: allocate_kv_cache(nb, page, H, D, kv_dtype, True, DEV)  # noqa: E731  (the engine's layout)
    ref, out = mk(), mk()
    reference.write_kv(k, v, *ref[:2], slots, *ref[2:])
    tk().write_kv(k, v, *out[:2], slots, *out[2:])
    for c, s, rc, rs in ((out.k, out.k_scale, ref.k, ref.k_scale), (out.v, out.v_scale, ref.v, ref.v_scale)):
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
        want = reference.dequantize_kv(rc, rs)
        assert ((reference.dequantize_kv(c, s) - want).abs() <= step_bound(want, rs, kv_dtype)).all()
        assert (as_bytes(c) == as_bytes(rc)).float().mean() > 0.99


@gpu
@pytest.mark.parametrize("kd", ["int8", "fp8"])
def test_tiny_engine_quantized_cuda_graphs_gpu(tiny_engines, kd):
    """On CUDA (float32 compute, Triton kernels, decode replayed from CUDA graphs): the logits of the CPU
    reference path of the same quantized engine, within what a one-step difference in a few quantized
    values moves them (the GPU divides approximately), and its greedy tokens where they are clear."""
    prompt = [random.Random(2).randrange(3, 384) for _ in range(45)]
    want, want_tokens = prefill_then_decode_logits(tiny_engines[kd], prompt, 8)
    got, got_tokens = prefill_then_decode_logits(tiny_engines[kd], prompt, 8, follow=want_tokens, device="cuda",
                                                 dtype="float32")
    diff = (got - want).abs().max().item()
    assert diff < LOGIT_ATOL[kd] / 4, diff
    top2 = want[-9:-1].topk(2, dim=-1).values
    clear = [i for i, m in enumerate((top2[:, 0] - top2[:, 1]).tolist()) if m > 2 * diff]
    assert len(clear) >= 6 and [got_tokens[i] for i in clear] == [want_tokens[i] for i in clear]


@gpu
def test_build_time_tuner_times_the_quantized_cache_gpu():
    """`llmc build --device cuda --kv-cache-dtype fp8` tunes attention on an fp8 cache: every family's
    default variant runs and the winner is no slower."""
    from llmc.build import tuning
    from llmc.config import QuantConfig

    cfg = BuildConfig(max_batch_size=8, max_seq_len=1024, max_num_tokens=512, kv_cache_dtype="fp8")
    model = ModelConfig(model_type="llama", vocab_size=256, hidden_size=512, intermediate_size=1024,
                        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                        max_position_embeddings=1024)
    res = tuning.tune(model, cfg, QuantConfig(), show_progress=False, seconds_per_family=5)
    for fam in res["tuning"]["families"]:
        assert "error" not in fam["candidates"][0] and fam["winner_ms"] <= fam["default_ms"] + 1e-9
