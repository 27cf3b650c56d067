"""Shared fixtures: the real SmolLM2-135M engine (built once per session) and tiny random HF models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SMOL_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Without a GPU the Triton kernels run under the interpreter, which must be chosen before triton is first
# imported: triton decorates its own jit helpers (tl.cdiv, ...) then, so a module that imported it earlier
# without the switch (test_sass_offline compiles in a subprocess) left them uncallable from interpreted
# kernels in every later test. Set here, before any test module loads, the suite no longer depends on order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _require_smol() -> Path:
    """The bundled GGUF; skips where it is not installed (the GPU machine) unless LLMC_TEST_REQUIRE_SMOL=1
    (``make test`` sets it, so CI fails instead of skipping)."""
    from llmc.convert.resolve import resolve_alias
    from llmc.errors import CheckpointError

    try:
        return resolve_alias("smollm2-135m")
    except CheckpointError as e:
        if os.environ.get("LLMC_TEST_REQUIRE_SMOL") == "1":
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    return _require_smol()


@pytest.fixture(scope="session")
def smol_ckpt(tmp_path_factory) -> Path:
    from llmc.convert import convert

    _require_smol()
    return convert("smollm2-135m", tmp_path_factory.mktemp("smol") / "ckpt", dtype="float32")


@pytest.fixture(scope="session")
def smol_engine(smol_ckpt, tmp_path_factory) -> Path:
    from llmc.build.builder import build
    from llmc.config import BuildConfig

    return build(smol_ckpt, tmp_path_factory.mktemp("smol") / "engine",
                 BuildConfig(max_batch_size=32, max_seq_len=1024, max_num_tokens=256))


@pytest.fixture(scope="session")
def smol_hf(smol_gguf):
    """Hugging Face transformers' own reading of the same GGUF: the reference."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name,
                                             dtype=torch.float32)
    return m.eval()


TINY_BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

TINY_VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama3-rope": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "qwen2-bias": ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": False}),
    "mistral": ("mistral", {"sliding_window": None, "head_dim": 32}),
}


def make_tiny_hf(kind: str, path: Path) -> Path:
    """A random-weight HF checkpoint written by transformers itself (seeded)."""
    import transformers

    model_type, extra = TINY_VARIANTS[kind]
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[model_type]
    cfg = cfg_cls(**{**TINY_BASE, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if model_type == "qwen2":  # random biases, so a dropped bias cannot pass
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(p.bias, std=0.5)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """Returns (hf_dir, engine_dir) for a tiny variant, cached per session."""
    from llmc.build.builder import build
    from llmc.config import BuildConfig
    from llmc.convert import convert

    cache: dict = {}

    def get(kind: str, block_size: int = 16):
        key = (kind, block_size)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{kind}")
            hf = make_tiny_hf(kind, root / "hf")
            ck = convert(str(hf), root / "ckpt", dtype="float32")
            eng = build(ck, root / "engine", BuildConfig(max_batch_size=16, max_seq_len=256, max_num_tokens=64,
                                                        block_size=block_size))
            cache[key] = (hf, eng)
        return cache[key]

    return get
