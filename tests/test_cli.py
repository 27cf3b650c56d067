"""The CLI end to end, and every bad input the foundation promises a one-line error for."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from llmc.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(res, *needles):
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_alias(tmp_path):
    assert_one_line_error(run("convert", "--model", "no-such-model", "-o", tmp_path / "c"), "no-such-model")


def test_missing_dir(tmp_path):
    assert_one_line_error(run("convert", "--model", tmp_path / "nope", "-o", tmp_path / "c"),
                          "no such file or directory")


def test_truncated_safetensors(tiny_factory, tmp_path):
    hf, _ = tiny_factory("llama-gqa")
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("convert", "--model", bad, "-o", tmp_path / "c"), "truncated")


def copy_with_config(src, dst, **changes):
    """A copy of an HF model directory with some config.json fields changed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_model_type(tiny_factory, tmp_path):
    bad = copy_with_config(tiny_factory("llama-gqa")[0], tmp_path / "gpt2ish", model_type="gpt2")
    assert_one_line_error(run("convert", "--model", bad, "-o", tmp_path / "c"), "unsupported model_type 'gpt2'")


def test_sliding_window_refused(tiny_factory, tmp_path):
    bad = copy_with_config(tiny_factory("mistral")[0], tmp_path / "swa", sliding_window=128)
    assert_one_line_error(run("convert", "--model", bad, "-o", tmp_path / "c"), "sliding-window")


def test_pickle_refused_without_flag(tiny_factory, tmp_path):
    import torch
    from safetensors.torch import load_file

    hf, _ = tiny_factory("llama-gqa")
    pk = tmp_path / "pickled"
    pk.mkdir()
    shutil.copy(hf / "config.json", pk / "config.json")
    torch.save(load_file(str(hf / "model.safetensors")), pk / "pytorch_model.bin")
    assert_one_line_error(run("convert", "--model", pk, "-o", tmp_path / "c"), "--allow-pickle")
    res = run("convert", "--model", pk, "-o", tmp_path / "c", "--allow-pickle", "--dtype", "float32")
    assert res.exit_code == 0, res.output


def test_newer_engine_format_refused(tiny_factory, tmp_path):
    _, eng = tiny_factory("llama-gqa")
    new = tmp_path / "engine"
    shutil.copytree(eng, new)
    doc = json.loads((new / "engine.json").read_text())
    doc["format_version"] = 99
    (new / "engine.json").write_text(json.dumps(doc))
    assert_one_line_error(run("info", new), "newer", "upgrade llmc")
    assert_one_line_error(run("generate", new, "hi"), "newer")


def test_checkpoint_is_not_an_engine(smol_ckpt):
    assert_one_line_error(run("generate", smol_ckpt, "hi"), "llmc build")


def test_cli_convert_build_info_generate(tmp_path, smol_engine):
    res = run("info", smol_engine)
    assert res.exit_code == 0 and "hidden size" in res.output and "576" in res.output
    res = run("generate", smol_engine, "What is the capital of France?", "--chat", "--max-tokens", "16")
    assert res.exit_code == 0, res.output
    assert "Paris" in res.output


def test_cli_full_pipeline_tiny(tiny_factory, tmp_path):
    hf, _ = tiny_factory("qwen2-bias")
    assert run("convert", "--model", hf, "-o", tmp_path / "ck").exit_code == 0
    res = run("build", tmp_path / "ck", "-o", tmp_path / "en", "--max-seq-len", "128", "--max-batch-size", "4",
              "--max-num-tokens", "64")
    assert res.exit_code == 0, res.output
    res = run("info", tmp_path / "en")
    assert "qwen2" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--max-seq-len", "100000"], "exceeds the model's context"),
    (["--max-batch-size", "0"], "positive integer"),
    (["--max-num-tokens", "8", "--max-batch-size", "16"], "--max-num-tokens"),
])
def test_build_bad_limits(smol_ckpt, tmp_path, args, needle):
    assert_one_line_error(run("build", smol_ckpt, "-o", tmp_path / "e", *args), needle)



def test_cli_imports_without_serve_or_gguf_extras():
    """`llmc build`/`bench` must run where only the core deps exist (the GPU machine has no uvicorn)."""
    import subprocess
    import sys

    code = ("import sys, llmc.cli; bad = [m for m in ('uvicorn', 'fastapi', 'gguf') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
