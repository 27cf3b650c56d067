"""Build-time tactic selection (``llmc/build/tuning.py``): selection logic with an injected timer, variant
checking, storage in engine.json, application at load. Kernels run under the Triton interpreter on CPU."""
from __future__ import annotations

import copy
import json

import pytest
import torch

CUDA = torch.cuda.is_available()

pytest.importorskip("triton", reason="triton is not installed: the tuner times Triton kernels")

from llmc.build import tuning  # noqa: E402
from llmc.config import BuildConfig, ModelConfig, QuantConfig  # noqa: E402
from llmc.errors import ConfigError  # noqa: E402
from llmc.plugins import gemv  # noqa: E402
from llmc.plugins import quant_gemm as qg  # noqa: E402
from llmc.plugins import triton_kernels as tk  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TINY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
SMALL = BuildConfig(max_batch_size=2, max_seq_len=48, max_num_tokens=16, block_size=16, dtype="float32")


def fake_timer_preferring(key: str, value, module=tk):
    """A timer under which the variant with ``TACTICS[key] == value`` is fastest (others by distance)."""
    def timer(fn):
        fn()
        return 1.0 + abs(module.TACTICS[key] - value)
    return timer


def test_picks_the_fastest_valid_variant_and_restores_tactics():
    saved = dict(tk.TACTICS)
    fam = tuning._attention_families(TINY, SMALL, DEV, torch.float32)[0]
    fam.candidates = [(32, 4, 2), (64, 4, 2), (128, 4, 2)]
    res = tuning.tune_family(fam, fake_timer_preferring("decode_block_n", 128), tol=1e-3)
    assert res["winner"]["decode_block_n"] == 128
    assert res["winner_ms"] < res["default_ms"]
    assert tk.TACTICS == saved


def test_gemm_cases_cycle_through_enough_weight_copies_to_miss_l2():
    """On CUDA a case streams >= 256 MB of weight copies (a 32 MB one alone would sit in the H200's L2), at most
    64 of them; off CUDA one copy. The cycled case runs every copy and returns the last one's output."""
    made = []
    assert len(tuning._cold(lambda: made.append(1), 32 << 20, "cuda")) == 8
    assert len(tuning._cold(lambda: 0, 300 << 20, "cuda:0")) == 1
    assert len(tuning._cold(lambda: 0, 1 << 10, "cuda")) == 64
    assert len(tuning._cold(lambda: 0, 32 << 20, "cpu")) == 1 and len(made) == 8
    seen = []
    case = tuning._cycle(lambda w: seen.append(w) or torch.tensor(float(w)), [1, 2, 3])
    assert float(case()) == 3.0 and seen == [1, 2, 3]
    copies = tuning._cold_tensors({"q": torch.ones(4, dtype=torch.int8)}, "cpu")
    assert len(copies) == 1 and torch.equal(copies[0]["q"], torch.ones(4, dtype=torch.int8))


def test_progress_bar_reaches_its_total_when_the_default_is_in_the_grid():
    """``tune`` sizes the bar as grid + default; a default that is also a grid point runs once, and the bar
    must still end full (the 7B int4 build's bar stopped at 113 of 120)."""
    import io

    from tqdm import tqdm

    fam = tuning._attention_families(TINY, SMALL, DEV, torch.float32)[0]
    fam.candidates = fam.candidates[:2] + [tuple(tk.TACTICS[k] for k in fam.keys)]
    with tqdm(total=len(fam.candidates) + 1, file=io.StringIO()) as bar:
        tuning.tune_family(fam, fake_timer_preferring("decode_block_n", 64), 1e-3, bar)
        assert bar.n == bar.total


def test_failing_and_wrong_variants_are_dropped(monkeypatch):
    fam = tuning.Family("toy", "triton_kernels", ("decode_block_n",), [(32,), (64,), (128,)], [])
    state = {}

    def case():
        n = tk.TACTICS["decode_block_n"]
        if n == 32:
            raise RuntimeError("out of shared memory")
        return torch.full((3,), 1.0 if n != 128 else 2.0)  # 128 computes something else
    fam.cases = [case]
    monkeypatch.setitem(tk.TACTICS, "decode_block_n", 64)
    res = tuning.tune_family(fam, lambda fn: state.setdefault("t", 0) + 1.0 / tk.TACTICS["decode_block_n"], 1e-3)
    by_cfg = {r["cfg"][0]: r for r in res["candidates"]}
    assert "out of shared memory" in by_cfg[32]["error"] and "differs" in by_cfg[128]["error"]
    assert res["winner"] == {"decode_block_n": 64}


def test_tune_covers_attention_and_quantized_gemm_families(monkeypatch):
    fewer_gemv_tiles(monkeypatch)
    saved = copy.deepcopy(qg.TACTICS)

    def timer(fn):  # the int4 GEMV is fastest at 32-row tiles, whichever shape's entry is being tuned
        fn()
        return 1.0 + sum(abs(qg.TACTICS["per_shape"].get(s, {}).get("gemv_block_n", qg.TACTICS["gemv_block_n"]) - 32)
                         for s in ("128x64", "64x64", "256x64", "64x128"))
    res = tuning.tune(TINY, SMALL, QuantConfig("int4", group_size=32), device=DEV, timer=timer, show_progress=False,
                      seconds_per_family=300)
    names = [f["family"] for f in res["tuning"]["families"]]
    shapes = ["128x64", "64x64", "256x64", "64x128"]  # QKV, O, gate/up, down: the int4 GEMV's tiles per shape
    assert names == (["attention decode", "attention prefill"] + [f"int4 GEMV {s} (1 row)" for s in shapes]
                     + ["GEMV 64x64 (1 row)"])  # + the LM head's
    assert {s: e["gemv_block_n"] for s, e in res["quant_gemm"]["per_shape"].items()} == dict.fromkeys(shapes, 32)
    assert qg.TACTICS == saved  # restored after tuning
    tuning.apply_tactics({"quant_gemm": res["quant_gemm"]})
    try:
        assert qg.int4_gemv_tactics(256, 64)["gemv_block_n"] == 32
        assert qg.int4_gemv_tactics(512, 64) == {k: saved[k] for k in qg.PER_SHAPE_KEYS}  # an untuned shape
    finally:
        qg.TACTICS.clear()
        qg.TACTICS.update(saved)
    assert set(res["triton_kernels"]) == {"decode_block_n", "decode_num_warps", "decode_num_stages",
                                          "prefill_block_m", "prefill_block_n", "prefill_num_warps",
                                          "prefill_num_stages"}
    json.dumps(res)  # storable in engine.json


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_decode_grid_times_unpipelined_loads_and_short_contexts(kv):
    """Both caches time stages 1 (no shared-memory pipeline) and tiles of 32-128 tokens; a 1-byte cache tunes
    its own keys; the cases include a full batch of short contexts (128-in/128-out at
    max load)."""
    quant = tuning._attention_families(TINY, BuildConfig(**{**SMALL.__dict__, "kv_cache_dtype": kv}), DEV,
                                       torch.float32)[0]
    plain = tuning._attention_families(TINY, SMALL, DEV, torch.float32)[0]
    assert plain.keys == ("decode_block_n", "decode_num_warps", "decode_num_stages")
    assert quant.keys == ("decode_q8_block_n", "decode_q8_num_warps", "decode_q8_num_stages")
    for fam in (quant, plain):
        assert {c[2] for c in fam.candidates} == {1, 2, 3} and len(fam.cases) == 3
    assert {c[0] for c in quant.candidates} == {c[0] for c in plain.candidates} == {32, 64, 128}
    quant.candidates = [(64, 4, 2), (128, 4, 1)]
    res = tuning.tune_family(quant, fake_timer_preferring("decode_q8_num_stages", 1), tol=1e-3)
    assert all("error" not in c for c in res["candidates"]), res["candidates"]
    assert res["winner"] == {"decode_q8_block_n": 128, "decode_q8_num_warps": 4, "decode_q8_num_stages": 1}


def fewer_gemv_tiles(monkeypatch) -> None:
    """The interpreter runs every GEMV candidate on every case: time 4 tile variants, not the whole grid."""
    real = tuning._gemv_families

    def trimmed(*args):
        fams = real(*args)
        for fam in fams:
            if fam.scope is not None:  # a shape's switch and tiles, not the row limit
                fam.candidates = fam.candidates[:3] + [(1, 16, 512, 4)]
        return fams
    monkeypatch.setattr(tuning, "_gemv_families", trimmed)


def test_fp8_tunes_the_library_crossover_with_earlier_winners_applied(monkeypatch):
    """fp8 engines also time from how many rows cuBLASLt's FP8 GEMM beats the decode tiling (batched decode);
    that family runs with the decode-rows winner in place, and every table is restored afterwards."""
    saved = dict(qg.TACTICS)
    seen = []

    def timer(fn):
        fn()
        seen.append((qg.TACTICS["small_block_n"], qg.TACTICS["scaled_mm_min_m"]))
        return 1.0 + abs(qg.TACTICS["small_block_n"] - 64) + abs(qg.TACTICS["scaled_mm_min_m"] - 33) / 100
    fewer_gemv_tiles(monkeypatch)
    res = tuning.tune(TINY, SMALL, QuantConfig("fp8"), device=DEV, timer=timer, show_progress=False,
                      seconds_per_family=300)
    names = [f["family"] for f in res["tuning"]["families"]]
    assert names[2:4] == ["fp8 GEMM (decode rows)", "fp8 library GEMM from M rows"]
    assert names[-1] == "GEMV up to M rows" and all(n.startswith("GEMV ") for n in names[4:])
    assert res["quant_gemm"]["small_block_n"] == 64 and res["quant_gemm"]["scaled_mm_min_m"] == 33
    assert all(bn == 64 for bn, m in seen if m != saved["scaled_mm_min_m"])  # crossover timed with the winner
    assert qg.TACTICS == saved


def test_unquantized_engines_choose_the_gemv_per_shape_then_its_row_limit(monkeypatch):
    """A bf16/fp32 engine's linears are cuBLAS or the GEMV, chosen per weight shape (the LM head too, a
    shape met twice timed once) with that shape's tiles; then the row limit, with those choices in place.
    The quantized-GEMM families do not run, and the choices reach the dispatch once applied."""
    saved = copy.deepcopy(gemv.TACTICS)
    seen = []

    def timer(fn):
        fn()
        per = gemv.TACTICS["per_shape"]
        seen.append((copy.deepcopy(per), gemv.TACTICS["max_m"]))
        cost = 1.0 + abs(gemv.TACTICS["max_m"] - 2) / 100
        for shape, e in per.items():
            if shape == "256x64":  # gate/up: the library GEMM is faster there
                cost += 0.0 if e.get("use", 1) == 0 else 1.0
            else:
                cost += abs(e.get("block_n", 4) - 16) + (0.5 if e.get("use", 1) == 0 else 0.0)
        return cost
    fewer_gemv_tiles(monkeypatch)
    res = tuning.tune(TINY, SMALL, QuantConfig("none"), device=DEV, timer=timer, show_progress=False,
                      seconds_per_family=300)
    names = [f["family"] for f in res["tuning"]["families"]]
    # QKV 128x64, O 64x64, gate/up 256x64, down 64x128; the LM head (64x64) is the O projection's shape
    assert names == ["attention decode", "attention prefill", "GEMV 128x64 (1 row)", "GEMV 64x64 (1 row)",
                     "GEMV 256x64 (1 row)", "GEMV 64x128 (1 row)", "GEMV up to M rows"]
    per = res["gemv"]["per_shape"]
    assert per["256x64"]["use"] == 0
    assert all(per[s]["use"] == 1 and per[s]["block_n"] == 16 for s in ("128x64", "64x64", "64x128"))
    assert res["gemv"]["max_m"] == 2
    assert all(p.get("128x64", {}).get("block_n") == 16 for p, m in seen if m != saved["max_m"])
    assert gemv.TACTICS == saved
    json.dumps(res)
    try:
        tuning.apply_tactics({"gemv": {k: v for k, v in res["gemv"].items()}})
        assert gemv.applies(1, 2, 128, 64) and not gemv.applies(1, 2, 256, 64)
        assert gemv.applies(2, 2, 64, 64) and not gemv.applies(3, 2, 64, 64)
        with pytest.raises(ConfigError, match="per_shape"):
            tuning.apply_tactics({"gemv": {"per_shape": {"64x64": {"split_k": 3}}}})
    finally:
        gemv.TACTICS.clear()
        gemv.TACTICS.update(saved)


def test_w8a8_times_gemv_tiles_with_it_on_and_may_switch_it_on(monkeypatch):
    """W8A8 decode rows take the MMA tiling unless the tuner finds the GEMV faster: its tile cases run the
    GEMV, and the row-limit family decides the switch."""
    fams = tuning._gemv_families(TINY, QuantConfig("w8a8"), DEV, torch.float32)
    assert fams[-1].keys == ("q8_max_m", "w8a8_gemv") and (1, 0) in fams[-1].candidates
    calls, real = [], gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fams[0].cases[0]()
    assert calls and gemv.TACTICS["w8a8_gemv"] == 0


def test_fp8_gemv_families_time_each_f16_products_variant_once():
    """fp8 rows against fp8 weights take the f16 products, which always load the activations as one vector:
    the per-shape grids hold no variant twice (``x_vector`` 0 and 1 were the same kernel), the 16-bit LM
    head keeps both."""
    import dataclasses

    model = dataclasses.replace(TINY, vocab_size=96)  # an LM head shape of its own (64 x 64 is also O's)
    fams = tuning._gemv_families(model, QuantConfig("fp8"), DEV, torch.float32)
    shapes = [f for f in fams if f.name.endswith("(1 row)")]
    head = shapes[-1]
    assert head.name.startswith("GEMV 96x64")
    for fam in shapes[:-1]:
        assert len(set(fam.candidates)) == len(fam.candidates), fam.name
        assert {c[4] for c in fam.candidates[1:]} == {1}, fam.name
    assert {c[4] for c in head.candidates[1:]} == {0, 1}
    assert len(shapes[0].candidates) < len(head.candidates)


def test_build_stores_tactics_and_runner_applies_them(tiny_factory, tmp_path, monkeypatch):
    from llmc.build import builder
    from llmc.build.engine import load_engine

    _, eng = tiny_factory("llama-gqa")
    monkeypatch.setattr(builder, "current_cuda_target",
                        lambda: {"device": "cuda", "device_name": "test GPU", "compute_capability": "9.0"})
    calls = {}

    def fake_tune(model, cfg, quant):
        calls["n"] = calls.get("n", 0) + 1
        return {"triton_kernels": {"decode_block_n": 32}, "tuning": {"seconds": 0.0, "families": []}}
    monkeypatch.setattr(tuning, "tune", fake_tune)
    cfg = BuildConfig(max_batch_size=4, max_seq_len=64, max_num_tokens=32, device="cuda")
    out = builder.build(eng.parent / "ckpt", tmp_path / "e", cfg)
    assert calls["n"] == 1
    assert load_engine(out).tactics["triton_kernels"] == {"decode_block_n": 32}
    builder.build(eng.parent / "ckpt", tmp_path / "e2", cfg, tune=False)
    assert calls["n"] == 1 and load_engine(tmp_path / "e2").tactics == {}
    monkeypatch.setitem(tk.TACTICS, "decode_block_n", 64)
    tuning.apply_tactics(load_engine(out).tactics)
    assert tk.TACTICS["decode_block_n"] == 32


def test_apply_rejects_tactics_from_another_version(monkeypatch):
    with pytest.raises(ConfigError, match="unknown keys.*rebuild"):
        tuning.apply_tactics({"triton_kernels": {"no_such_tile": 1}})
    with pytest.raises(ConfigError, match="unknown kernel module"):
        tuning.apply_tactics({"cutlass": {}})


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["int8", "int4", "none"])
def test_real_tuner_on_gpu(method):
    """The real timer on real kernels: every family (per-shape ones included) runs, winners are no slower than
    the defaults, and the engine's tactics load back."""
    cfg = BuildConfig(max_batch_size=8, max_seq_len=1024, max_num_tokens=512, block_size=16, dtype="bfloat16")
    model = ModelConfig(model_type="llama", vocab_size=256, hidden_size=512, intermediate_size=1024,
                        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                        max_position_embeddings=1024)
    quant = QuantConfig(method, group_size=128) if method == "int4" else QuantConfig(method)
    saved = {m: copy.deepcopy(tuning._module(m).TACTICS) for m in tuning.TUNABLE_MODULES}
    res = tuning.tune(model, cfg, quant, show_progress=False, seconds_per_family=20)
    for fam in res["tuning"]["families"]:
        assert fam["winner_ms"] <= fam["default_ms"] + 1e-9
    if method == "int4":
        assert len(res["quant_gemm"]["per_shape"]) == 4
    try:
        tuning.apply_tactics({k: v for k, v in res.items() if k != "tuning"})
    finally:
        for m, table in saved.items():
            tuning._module(m).TACTICS.clear()
            tuning._module(m).TACTICS.update(table)
