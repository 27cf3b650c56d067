"""Megatron-style tensor-parallel sharding of engine tensors (``llmc build --tp-size N``).

Column-parallel: QKV (each rank takes its query heads and the KV heads they read; KV heads are replicated
when there are fewer than ranks) and gate/up (gate and up split separately, then re-fused). Row-parallel:
o_proj and down_proj split along the input dim (a bias lives on rank 0 only, so the all-reduce adds it once).
Vocab-parallel: embedding and LM head rows split into equal shards of the vocabulary padded to a multiple
of N. Norms are replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmc.config import ModelConfig
from llmc.errors import ConfigError


@dataclass(frozen=True)
class TPLayout:
    """What one rank holds; derived from the model config and (rank, size) alone."""

    rank: int
    size: int
    q_heads: int  # local query heads
    kv_heads: int  # local KV heads (1 when replicated)
    kv_head_start: int  # first global KV head held
    intermediate: int
    vocab_shard: int  # rows of the padded vocabulary per rank

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_shard


def tp_layout(cfg: ModelConfig, rank: int, size: int) -> TPLayout:
    """Rank ``rank``'s share, or a ConfigError naming the dimension ``size`` cannot split. KV heads split
    only if every rank's query heads then read whole local KV heads (uniform GQA groups on each rank)."""
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if hq % size:
        raise ConfigError(f"--tp-size {size} must divide num_attention_heads ({hq})")
    if cfg.intermediate_size % size:
        raise ConfigError(f"--tp-size {size} must divide intermediate_size ({cfg.intermediate_size})")
    if hkv >= size:
        if hkv % size:
            raise ConfigError(f"--tp-size {size} must divide num_key_value_heads ({hkv}) or exceed it")
        kv_local, kv_start = hkv // size, rank * (hkv // size)
    else:
        if size % hkv:
            raise ConfigError(f"with {hkv} KV heads, --tp-size must be a multiple of {hkv}")
        kv_local, kv_start = 1, rank * hkv // size  # replicated: each rank keeps the head its queries use
    return TPLayout(rank, size, hq // size, kv_local, kv_start, cfg.intermediate_size // size,
                    -(-cfg.vocab_size // size))


def _rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    return t[start:start + n]


def shard_tensor(name: str, t: torch.Tensor, cfg: ModelConfig, lay: TPLayout) -> torch.Tensor:
    """The piece of engine tensor ``name`` that rank ``lay.rank`` holds."""
    d, r = cfg.head_dim, lay.rank
    m = re.fullmatch(r"layers\.\d+\.(self_attn|mlp)\.(\w+)\.(weight|bias)", name)
    if m:
        module, kind = m.group(2), m.group(3)
        if module == "qkv_proj":
            q, k, v = t.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)
            qs = _rows(q, r * lay.q_heads * d, lay.q_heads * d)
            ks = _rows(k, lay.kv_head_start * d, lay.kv_heads * d)
            vs = _rows(v, lay.kv_head_start * d, lay.kv_heads * d)
            return torch.cat([qs, ks, vs])
        if module == "gate_up_proj":
            g, u = t.chunk(2, dim=0)
            return torch.cat([_rows(g, r * lay.intermediate, lay.intermediate),
                              _rows(u, r * lay.intermediate, lay.intermediate)])
        if module in ("o_proj", "down_proj"):
            if kind == "bias":
                return t if r == 0 else torch.zeros_like(t)
            width = lay.q_heads * d if module == "o_proj" else lay.intermediate
            return t[:, r * width:(r + 1) * width]
    if name in ("embed_tokens.weight", "lm_head.weight"):
        pad = lay.vocab_shard * lay.size - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros(pad, t.shape[1])])
        return _rows(t, lay.vocab_start, lay.vocab_shard)
    return t  # norms: replicated


def check_shardable(cfg: ModelConfig, quantized: bool, size: int) -> None:
    """Refuse at build time what cannot be sharded: quantized layouts (packed int4 along the input dim,
    per-group scales, AWQ/SmoothQuant input scales shared across a fused group) are not split yet."""
    if size > 1 and quantized:
        raise ConfigError("tensor parallelism of quantized engines is not supported yet; build with --tp-size 1 "
                          "or from an unquantized checkpoint")
    tp_layout(cfg, 0, size)
