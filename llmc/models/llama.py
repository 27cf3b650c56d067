"""The Llama-family decoder, written once for every backend.

The forward takes a flat batch (DESIGN.md "Execution"): ``input_ids [T]``, ``positions [T]``, attention
metadata, and one ``KVCache`` per layer (K/V pools, plus scales when quantized). It has no data-dependent
Python control flow outside the attention op, so the same module is exported to ONNX with attention as a
plugin node.
Projections are fused (QKV, gate/up): the engine stores them concatenated along the output dim.
"""
from __future__ import annotations

import torch
from torch import nn

from llmc.config import ModelConfig, QuantConfig
from llmc.models.linear import make_linear
from llmc.models.rope import cos_sin_cache
from llmc.plugins import ops
from llmc.plugins.act_quant import QuantizedRows
from llmc.plugins.kv_layout import KVCache
from llmc.plugins.metadata import AttentionMetadata


class TP:
    """This rank's share of a tensor-parallel model (``layout``) and its process group; ``None`` = one rank."""

    def __init__(self, layout, group=None):
        self.layout, self.group = layout, group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.layout.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, consumer: nn.Module | None = None):
        """``consumer``: the linear that reads the result; an fp8/w8a8 one gets its rows quantized here."""
        quant = _producer_quant(consumer)
        if residual is None:
            if quant:
                return ops.rms_norm_quant(x, self.weight, self.eps, *quant)
            return ops.rms_norm(x, self.weight, self.eps)
        if quant:
            return ops.fused_add_rms_norm_quant(x, residual, self.weight, self.eps, *quant)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


def _producer_quant(linear: nn.Module | None):
    """``(method, input_scale)`` when ``linear`` reads per-token quantized rows and the fusion is on."""
    if linear is None or not ops.FUSIONS["act_quant"]:
        return None
    return getattr(linear, "producer_quant", None)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None, dtype: torch.dtype, tp: TP | None = None):
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if tp is not None:
            self.num_heads, self.num_kv_heads = tp.layout.q_heads, tp.layout.kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = make_linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, quant, dtype)
        self.o_proj = make_linear(self.q_size, cfg.hidden_size, False, quant, dtype)  # row-parallel under TP

    def forward(self, x: torch.Tensor | QuantizedRows, positions: torch.Tensor, cos_sin: torch.Tensor,
                kv: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        q = ops.rope_write_kv(positions, q, k, v, cos_sin, kv.k, kv.v, meta.slot_mapping, kv.k_scale, kv.v_scale)
        o = ops.paged_attention(q, kv.k, kv.v, meta, self.scale, kv.k_scale, kv.v_scale)
        out = self.o_proj(o.reshape(-1, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None, dtype: torch.dtype, tp: TP | None = None):
        super().__init__()
        self.tp = tp
        inter = cfg.intermediate_size if tp is None else tp.layout.intermediate
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * inter, cfg.mlp_bias, quant, dtype)
        self.down_proj = make_linear(inter, cfg.hidden_size, cfg.mlp_bias, quant, dtype)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        quant = _producer_quant(self.down_proj)
        out = self.down_proj(ops.silu_and_mul_quant(gate_up, *quant) if quant else ops.silu_and_mul(gate_up))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None, dtype: torch.dtype, tp: TP | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, quant, dtype, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, quant, dtype, tp)

    def forward(self, x, residual, positions, cos_sin, kv, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x, consumer=self.self_attn.qkv_proj)
        else:
            x, residual = self.input_layernorm(x, residual, consumer=self.self_attn.qkv_proj)
        x = self.self_attn(x, positions, cos_sin, kv, meta)
        x, residual = self.post_attention_layernorm(x, residual, consumer=self.mlp.gate_up_proj)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Embedding -> N decoder layers -> final norm; ``compute_logits`` applies the (maybe tied) LM head."""

    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None = None, dtype: torch.dtype = torch.float32,
                 max_positions: int | None = None, tp: TP | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp
        vocab = cfg.vocab_size if tp is None else tp.layout.vocab_shard  # vocab-parallel under TP
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, quant, dtype, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # The LM head is never quantized (accuracy); tied models reuse the embedding matrix.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, vocab, bias=False, dtype=dtype)
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)
        n = max_positions or cfg.max_position_embeddings
        self.register_buffer("cos_sin", cos_sin_cache(cfg, n, self.embed_tokens.weight.device), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` for a flat batch; K/V of the new tokens are written to the cache."""
        x = self.embed(input_ids)
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.cos_sin, kv, meta)
        x, _ = self.norm(x, residual)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_tokens(input_ids)
        start = self.tp.layout.vocab_start
        local = input_ids - start
        mine = (local >= 0) & (local < self.embed_tokens.num_embeddings)
        x = self.embed_tokens(torch.where(mine, local, 0)) * mine[:, None].to(self.embed_tokens.weight.dtype)
        return self.tp.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = ops.linear(hidden, w).float()
        if self.tp is not None:
            logits = self.tp.all_gather_last(logits)[..., : self.config.vocab_size]
        return logits
