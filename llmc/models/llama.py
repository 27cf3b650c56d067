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
from llmc.models.linear import Linear, make_linear
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
        out = self.o_proj(self.attend(self.qkv_proj(x), positions, cos_sin, kv, meta))
        return out if self.tp is None else self.tp.all_reduce(out)

    def attend(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, kv: KVCache,
               meta: AttentionMetadata) -> torch.Tensor:
        """RoPE, K/V into the cache, attention: the o_proj input ``[T, q_size]`` from the fused QKV rows."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        q = ops.rope_write_kv(positions, q, k, v, cos_sin, kv.k, kv.v, meta.slot_mapping, kv.k_scale, kv.v_scale)
        return ops.paged_attention(q, kv.k, kv.v, meta, self.scale, kv.k_scale, kv.v_scale).reshape(-1, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None, dtype: torch.dtype, tp: TP | None = None):
        super().__init__()
        self.tp = tp
        inter = cfg.intermediate_size if tp is None else tp.layout.intermediate
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * inter, cfg.mlp_bias, quant, dtype)
        self.down_proj = make_linear(inter, cfg.hidden_size, cfg.mlp_bias, quant, dtype)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if self.swiglu_fused(x):
            out = self.down_proj(self.gate_up_proj(x, swiglu=True))
        else:
            out = self.down_proj(self.act(self.gate_up_proj(x)))
        return out if self.tp is None else self.tp.all_reduce(out)

    def swiglu_fused(self, x) -> bool:
        """Whether the gate/up GEMV applies the SwiGLU to rows like ``x`` itself (``FUSIONS["swiglu_gemv"]``):
        decode rows on the GPU, a float down_proj input (fp8/w8a8 down projections read quantized rows)."""
        return (ops.FUSIONS["swiglu_gemv"] and _producer_quant(self.down_proj) is None
                and getattr(self.gate_up_proj, "swiglu_fuses", lambda _: False)(x))

    def act(self, gate_up: torch.Tensor) -> torch.Tensor | QuantizedRows:
        """SwiGLU: the down_proj input (per-token quantized where that linear reads such rows)."""
        quant = _producer_quant(self.down_proj)
        return ops.silu_and_mul_quant(gate_up, *quant) if quant else ops.silu_and_mul(gate_up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None, dtype: torch.dtype, tp: TP | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, quant, dtype, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, quant, dtype, tp)

    def forward(self, x, residual, positions, cos_sin, kv, meta):
        """``(x, residual)`` in and out: the stream is ``x + residual``; ``residual is None`` means ``x`` is the
        whole stream (the embeddings, or a down GEMV already added it)."""
        a = self.self_attn
        qkv, residual = _normed_projection(self.input_layernorm, a.qkv_proj, x, residual)
        x, residual = _residual_projection(a.o_proj, a.attend(qkv, positions, cos_sin, kv, meta), residual, a.tp)
        mlp = self.mlp
        fused = mlp.swiglu_fused(x)  # decode rows: the gate/up GEMV's epilogue computes the SwiGLU
        h, residual = _normed_projection(self.post_attention_layernorm, mlp.gate_up_proj, x, residual, fused)
        return _residual_projection(mlp.down_proj, h if fused else mlp.act(h), residual, mlp.tp)


def _normed_projection(norm: RMSNorm, linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
                       swiglu: bool = False):
    """``(linear(norm(x + residual)), x + residual)`` (``swiglu``: its SwiGLU, in the GEMV). Where ``norm``'s
    weight was folded into ``linear`` (``fold_norms``) and ``linear`` runs as the GEMV, the norm runs inside
    it; otherwise it is its own kernel (fused with the add and, for fp8/w8a8 linears, with quantizing the rows)."""
    act = {"swiglu": True} if swiglu else {}
    if getattr(linear, "norm_folded", False) and ops.FUSIONS["norm_gemv"] and ops.linear_fuses(x, linear.weight):
        h = x if residual is None else x + residual
        return linear(h, norm_eps=norm.eps, **act), h
    if residual is None:
        return linear(norm(x, consumer=linear), **act), x
    normed, h = norm(x, residual, consumer=linear)
    return linear(normed, **act), h


def _residual_projection(linear: nn.Module, x, residual: torch.Tensor, tp: TP | None):
    """``(out, residual)`` of a projection into the stream: a 16-bit GEMV adds ``residual`` itself (the stream
    comes back whole, residual ``None``); otherwise the next norm adds it (after the TP all-reduce)."""
    if (tp is None and type(linear) is Linear and ops.FUSIONS["norm_gemv"] and isinstance(x, torch.Tensor)
            and ops.linear_fuses(x, linear.weight)):
        return linear(x, residual=residual), None
    out = linear(x)
    return (out if tp is None else tp.all_reduce(out)), residual


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
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    @torch.no_grad()
    def fold_norms(self) -> int:
        """Fold each layer's RMSNorm weight into the 16-bit projection that reads it (``W' = W diag(g)``, ``g``
        set to 1), so that a decode row's norm can run inside that projection's GEMV (``_normed_projection``).
        Exact in real arithmetic; ``W'`` is rounded to the weight dtype once, so bf16 results move by bf16
        rounding (about 2^-9 relative). Quantized projections keep their norm. Returns how many were folded."""
        folded = 0
        for layer in self.layers:
            for norm, linear in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                                 (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
                if type(linear) is not Linear or getattr(linear, "norm_folded", False):
                    continue
                g = norm.weight.float()
                for rows in linear.weight.split(4096):  # bounded fp32 temporaries for large models
                    rows.copy_(rows.float() * g)
                norm.weight.fill_(1.0)
                linear.norm_folded = True
                folded += 1
        return folded

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
