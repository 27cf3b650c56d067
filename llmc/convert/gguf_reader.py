"""Read a GGUF file (llama.cpp's format): config from its metadata, tensors dequantized to float32
and renamed to the Hugging Face names the checkpoint uses, tokenizer and chat template from its vocab.

llama.cpp stores Llama Q/K projections with rows permuted for its interleaved RoPE; we undo that so the
weights match the Hugging Face (rotate-half) layout the model uses.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llmc.config import ModelConfig
from llmc.errors import CheckpointError

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ARCH_TO_TYPE = {"llama": "llama", "qwen2": "qwen2"}


def _open(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader, dtype: str | None) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_TO_TYPE:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}; llmc reads {', '.join(_ARCH_TO_TYPE)}")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointError("this GGUF uses Llama-3.1 rope frequency factors, which llmc reads only from the "
                              "Hugging Face checkpoint; convert the HF directory instead")

    def g(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    rope_scaling = None
    if g("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    return ModelConfig(
        model_type=_ARCH_TO_TYPE[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(g("context_length", 4096)),
        tie_word_embeddings=not has_output,
        attention_bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=[int(eos)] if eos is not None else [],
        dtype=dtype or "bfloat16",
    )


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert permutation of Q/K rows (interleaved -> rotate-half RoPE)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def hf_tensor_name(name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        part = _LAYER_MAP.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _TOP_MAP:
        return f"{_TOP_MAP[m.group(1)]}.{m.group(2)}"
    return None


def iter_gguf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    permuted = _field(reader, "general.architecture") == "llama"
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            raise CheckpointError(f"unexpected tensor {t.name!r} in GGUF; this file is not a plain Llama-family model")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # copy: GGUF data is a read-only memmap
        if permuted and ".q_proj." in name:
            w = _unpermute(w, cfg.num_attention_heads)
        elif permuted and ".k_proj." in name:
            w = _unpermute(w, cfg.num_key_value_heads)
        yield name, w


def read_gguf(path: Path, dtype: str | None):
    reader = _open(path)
    cfg = gguf_config(reader, dtype)
    return cfg, reader


def save_gguf_tokenizer(path: Path, out_dir: Path) -> None:
    """Rebuild the HF tokenizer (vocab, merges, chat template, special tokens) from the GGUF and save it."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build a tokenizer from this GGUF ({e})") from None
    tok.save_pretrained(str(out_dir))
