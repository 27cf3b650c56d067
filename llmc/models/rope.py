"""Rotary position embedding tables, with the scaling variants the Llama family uses."""
from __future__ import annotations

import math

import torch

from llmc.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies ``[head_dim / 2]``, after linear or Llama-3 scaling."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling or {}
    rtype = rs.get("rope_type", rs.get("type", "default"))
    if rtype == "linear":
        inv = inv / float(rs["factor"])
    elif rtype == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv


def cos_sin_cache(cfg: ModelConfig, max_positions: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[max_positions, head_dim]`` float32: cos in the first half of each row, sin in the second."""
    inv = inv_frequencies(cfg).float()
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
