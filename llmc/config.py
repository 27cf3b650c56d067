"""Typed, versioned configs shared by the checkpoint and engine formats.

``ModelConfig`` describes the network (one schema for the whole Llama family), ``QuantConfig`` how its
weights are stored, ``BuildConfig`` the limits an engine was built for. Each round-trips through a plain
JSON dict and validates on the way in, so a hand-edited or foreign file fails with a message, not later
with a shape error deep in the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmc.errors import ConfigError

CHECKPOINT_FORMAT = "llmc-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
ENGINE_FORMAT = "llmc-engine"
ENGINE_FORMAT_VERSION = 1

# HF model_type values the Llama-family definition covers.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "float16", "bfloat16")
QUANT_METHODS = ("none", "int8", "int4", "int4-awq", "fp8", "w8a8")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")
# Scheduler admission policies (llmc.runtime.scheduler), named as TensorRT-LLM names them.
SCHEDULER_POLICIES = ("max_utilization", "guaranteed_no_evict")


def _from_dict(cls, data: dict[str, Any], what: str):
    """Build dataclass ``cls`` from ``data``, naming unknown or missing keys in the error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {unknown}; was this file written by a newer llmc?")
    try:
        return cls(**data)
    except TypeError as e:  # missing required field
        raise ConfigError(f"{what}: {e}") from None


@dataclass
class ModelConfig:
    """A Llama-family decoder: Llama 2/3/3.1, Mistral (no sliding window), Qwen2, SmolLM2, TinyLlama."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; llmc supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; use one of {DTYPES}")
        if self.hidden_act != "silu":
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; only 'silu' (SwiGLU) is supported")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = [int(t) for t in (self.eos_token_id or [])]
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rtype not in ("default", "linear", "llama3"):
                raise ConfigError(
                    f"unsupported rope scaling {rtype!r}; llmc supports 'linear' and 'llama3' "
                    "(Llama 3.1); remove rope_scaling or convert a model without it"
                )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "model config")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype: str | None = None) -> "ModelConfig":
        """Translate a Hugging Face ``config.json`` dict, refusing what the model cannot run."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
                f"llmc supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        max_pos = int(hf.get("max_position_embeddings", 4096))
        sliding = hf.get("sliding_window")
        uses_sliding = hf.get("use_sliding_window", model_type == "mistral")
        if uses_sliding and sliding is not None and int(sliding) < max_pos:
            raise ConfigError(
                f"this {model_type} model uses sliding-window attention (window {sliding} < context "
                f"{max_pos}), which llmc does not support yet; use a model without it (e.g. Mistral v0.2+)"
            )
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        params = hf.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        eos = hf.get("eos_token_id")
        if eos is None:
            eos = []
        torch_dtype = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos if isinstance(eos, list) else [eos],
            dtype=dtype or str(torch_dtype).replace("torch.", ""),
        )


@dataclass
class QuantConfig:
    """How a checkpoint's linear weights are stored. ``method='none'`` means plain floating point."""

    method: str = "none"
    bits: int | None = None
    group_size: int | None = None
    calibration: dict[str, Any] | None = None  # summary of what calibration saw

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; use one of {', '.join(QUANT_METHODS)}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "QuantConfig":
        return cls() if data is None else _from_dict(cls, data, "quantization config")


@dataclass
class BuildConfig:
    """The limits and cache layout an engine is built for; the runtime never exceeds them."""

    # 256 as vLLM's max_num_seqs: on the H200, 7B fp8 at 128/128 gives 13.5k output tok/s at 256 vs 8.4k at 64
    max_batch_size: int = 256
    max_seq_len: int = 4096
    max_num_tokens: int = 2048  # token budget of one forward (prefill chunk + decodes)
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    dtype: str = "bfloat16"  # activation/compute dtype on the GPU
    device: str = "cpu"
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "block_size", "tp_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be 'cpu' or 'cuda', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildConfig":
        return _from_dict(cls, data, "build config")
