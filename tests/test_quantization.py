"""Quantization: the math on random weights, exact packing, and quantized engines that still work."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llmc import LLM, SamplingParams
from llmc.build.builder import build
from llmc.config import BuildConfig
from llmc.convert.quantize import quantize_checkpoint
from llmc.errors import ConfigError
from llmc.models import quant_linear as ql

W = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_int8_error_bound():
    q, s = ql.quantize_int8_per_channel(W)
    assert q.dtype == torch.int8
    # round-to-nearest: every element within half a step of its row's scale
    assert ((q.float() * s[:, None] - W).abs() <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_bound_and_packing(group):
    q, s, z = ql.quantize_int4_groupwise(W, group)
    assert int(q.max()) <= 15 and int(z.max()) <= 15
    packed = ql.pack_int4(q)
    assert packed.shape == (96, 128) and torch.equal(ql.unpack_int4(packed), q)  # exact round trip
    deq = ql.dequantize_int4(packed, s, z)
    step = s.repeat_interleave(group, dim=1)
    assert ((deq - W).abs() <= step * 0.5 + 1e-5).all()
    assert rel_err(deq, W) < 0.12


def test_fp8_and_activation_quant_bounds():
    q, s = ql.quantize_fp8_per_channel(W)
    assert q.dtype == torch.float8_e4m3fn
    assert rel_err(q.float() * s[:, None], W) < 0.04  # e4m3: 3 mantissa bits
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1))
    assert rel_err(ql.fake_quant_act_fp8(x), x) < 0.04
    assert rel_err(ql.fake_quant_act_int8(x), x) < 0.02


def test_awq_beats_rtn_on_outlier_activations():
    """Channels with large activations matter more; AWQ's scaling must reduce the output error."""
    from llmc.convert.quantize import awq_scale

    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 256, generator=g) * torch.where(torch.rand(256, generator=g) < 0.05, 20.0, 1.0)
    st = {"mean": x.abs().mean(0), "rows": x}
    s, _ = awq_scale(W, st, 64)
    deq = lambda w: ql.dequantize_int4(ql.pack_int4(ql.quantize_int4_groupwise(w, 64)[0]),  # noqa: E731
                                      *ql.quantize_int4_groupwise(w, 64)[1:])
    err_rtn = (x @ deq(W).T - x @ W.T).pow(2).mean()
    err_awq = ((x / s) @ deq(W * s).T - x @ W.T).pow(2).mean()
    assert err_awq < err_rtn


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_quantized_tiny_engine_close_to_float(tiny_factory, tmp_path, method):
    from tests.test_foundation import runner_logits

    _, eng = tiny_factory("qwen2-bias")  # biases stay float and must still be fused right
    ck = quantize_checkpoint(eng.parent / "ckpt", tmp_path / "ck", method, group_size=32)
    qeng = build(ck, tmp_path / "en", BuildConfig(max_batch_size=4, max_seq_len=256, max_num_tokens=64))
    ids = list(range(5, 45))
    ref, got = runner_logits(eng, ids), runner_logits(qeng, ids)
    assert rel_err(got, ref) < {"int8": 0.05, "int4": 0.5, "fp8": 0.3}[method]  # random nets amplify; a layout bug gives >1
    assert json.loads((qeng / "engine.json").read_text())["quantization"]["method"] == method


def test_awq_and_smoothquant_share_input_scale_across_fused_parts(smol_ckpt, tmp_path):
    ck = quantize_checkpoint(smol_ckpt, tmp_path / "awq", "int4-awq", group_size=64, calib_samples=16,
                             calib_seq_len=128)
    cfg = json.loads((ck / "config.json").read_text())["quantization"]
    assert cfg["calibration"]["samples"] == 16 and "pydoc" in cfg["calibration"]["source"]
    with safe_open(str(next(ck.glob("model-*.safetensors"))), "pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.input_scale")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.input_scale")
        assert torch.equal(q, k)
        assert "model.layers.0.self_attn.q_proj.weight" not in names
    eng = build(ck, tmp_path / "awq-eng", BuildConfig(max_batch_size=4, max_seq_len=512, max_num_tokens=128))
    out = LLM(eng, show_progress=False).generate("The capital of France is",
                                                 SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_quantized_smol_says_paris(smol_ckpt, tmp_path, method):
    eng = build(smol_ckpt, tmp_path / "e", BuildConfig(max_batch_size=4, max_seq_len=512, max_num_tokens=128),
                quant=method, calib_samples=4, calib_seq_len=64)
    out = LLM(eng, show_progress=False).generate("The capital of France is",
                                                 SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def test_bad_group_size_refused(smol_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="group-size 128"):
        quantize_checkpoint(smol_ckpt, tmp_path / "x", "int4", group_size=128)


def test_int4_bundle_is_about_a_quarter_of_bf16(tiny_factory, tmp_path):
    _, eng = tiny_factory("llama-gqa")
    ck = quantize_checkpoint(eng.parent / "ckpt", tmp_path / "ck", "int4", group_size=32)
    with safe_open(str(next(ck.glob("model-*.safetensors"))), "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.gate_proj.qweight")
    assert q.dtype == torch.uint8 and q.shape == (128, 32)  # [out, in / 2]: 4 bits per weight


def test_eval_ppl_cli(smol_engine, tmp_path):
    from click.testing import CliRunner

    from llmc.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    res = CliRunner().invoke(main, ["eval-ppl", str(smol_engine), "--text", str(text), "--window", "128",
                                    "--stride", "64", "--reference", str(smol_engine)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["top1_agreement"] == 1.0  # an engine agrees with itself
    assert 1.0 < out["ppl"] < 5.0  # a repeated sentence is easy to predict
    assert out["tokens"] > 300
