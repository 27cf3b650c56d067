"""Write an llmc checkpoint with random weights in a named shape (no real 7B weights can reach the GPU
machine). Every figure measured on such a checkpoint must say the weights were synthetic.

    python benchmarks/synthetic_ckpt.py llama-2-7b /tmp/ckpt [--dtype bfloat16] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmc.config import ModelConfig, QuantConfig  # noqa: E402
from llmc.convert.checkpoint import TORCH_DTYPES, ShardWriter, expected_tensor_names, write_config  # noqa: E402

SHAPES = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                       rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5, eos_token_id=[2]),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       eos_token_id=[128001]),
    "draft-llama2-vocab": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                               num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, head_dim=64,
                               rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
                               eos_token_id=[2]),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                 eos_token_id=[2]),
}


def tensor_shape(name: str, c: ModelConfig) -> tuple[int, ...]:
    h, i = c.hidden_size, c.intermediate_size
    if name.endswith("norm.weight"):
        return (h,)
    if "embed_tokens" in name or name.startswith("lm_head"):
        return (c.vocab_size, h)
    table = {"q_proj": (c.q_size, h), "k_proj": (c.kv_size, h), "v_proj": (c.kv_size, h), "o_proj": (h, c.q_size),
             "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    for k, shp in table.items():
        if f".{k}." in name:
            return shp if name.endswith("weight") else (shp[0],)
    raise KeyError(name)


def write_synthetic(shape: str, out: str | Path, dtype: str = "bfloat16", device: str = "cpu", seed: int = 0,
                    head_std: float = 0.5) -> Path:
    """``head_std``: a wide LM head makes random-weight logits confident (top-1 margins of several units), so
    bf16 rounding differences between kernel shapes (batch sizes, verification vs decode) do not flip greedy
    tokens; at HF's 0.02 nearly every argmax is a near-tie and speculative acceptance measures noise."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(**SHAPES[shape], dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    writer = ShardWriter(out)
    for name in tqdm(sorted(expected_tensor_names(cfg)), desc=f"synthetic {shape}", unit="tensor"):
        shp = tensor_shape(name, cfg)
        if name.endswith("norm.weight"):
            t = torch.ones(shp)
        else:  # std 0.02 like HF init keeps activations in a sane range through 32 layers
            std = head_std if name == "lm_head.weight" else 0.02
            t = torch.randn(shp, generator=g, device=device, dtype=torch.float32).mul_(std)
        writer.add(name, t.to(TORCH_DTYPES[dtype]).cpu())
    files = writer.close()
    write_config(out, cfg, QuantConfig(), {"model": f"synthetic:{shape}", "kind": "synthetic", "seed": seed}, files)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    print(json.dumps({"checkpoint": str(write_synthetic(a.shape, a.out, a.dtype, a.device)), "synthetic": True}))
