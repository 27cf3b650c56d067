"""The checkpoint format (DESIGN.md "Checkpoint"): ``config.json`` + sharded ``*.safetensors`` + ``tokenizer/``.

Tensor names are Hugging Face's (``model.layers.N.self_attn.q_proj.weight`` ...), so anyone with
``safetensors`` can read a checkpoint; quantized tensors sit beside their weights (docs/quantization.md).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from llmc import __version__
from llmc.config import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, ModelConfig, QuantConfig
from llmc.errors import CheckpointError

SHARD_BYTES = 2 * 1024**3
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def expected_tensor_names(cfg: ModelConfig) -> set[str]:
    """Names an unquantized checkpoint of ``cfg`` must contain, no more, no less."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{p}self_attn.{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{p}mlp.{proj}.weight")
            if cfg.mlp_bias:
                names.add(f"{p}mlp.{proj}.bias")
        if cfg.attention_bias:
            names |= {f"{p}self_attn.{x}_proj.bias" for x in "qkv"}
    return names


class ShardWriter:
    """Writes tensors into ~2 GiB safetensors shards plus an index, holding one shard in memory."""

    def __init__(self, out_dir: Path, prefix: str = "model", shard_bytes: int = SHARD_BYTES):
        self.out_dir, self.prefix, self.shard_bytes = out_dir, prefix, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, str] = {}
        self.num_shards = 0
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.weight_map or name in self.pending:
            raise CheckpointError(f"duplicate tensor {name!r}")
        t = t.contiguous()
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        self.num_shards += 1
        fname = f"{self.prefix}-{self.num_shards:05d}.safetensors"
        save_file(self.pending, str(self.out_dir / fname), metadata={"format": "pt"})
        for n in self.pending:
            self.weight_map[n] = fname
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self._flush()
        (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))},
            indent=1))
        return sorted(set(self.weight_map.values()))


def write_config(out_dir: Path, cfg: ModelConfig, quant: QuantConfig, source: dict, files: list[str]) -> None:
    doc = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "llmc_version": __version__,
        "model": cfg.to_dict(),
        "quantization": quant.to_dict() if quant.enabled else None,
        "source": source,
        "weights": files,
    }
    (out_dir / "config.json").write_text(json.dumps(doc, indent=2) + "\n")


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    quant: QuantConfig
    files: list[Path]
    source: dict

    def tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        from llmc.convert.hf_reader import iter_tensors

        return iter_tensors(self.files)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())

    @property
    def tokenizer_dir(self) -> Path | None:
        d = self.path / "tokenizer"
        return d if d.is_dir() else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not an llmc checkpoint (no config.json); create one with `llmc convert`")
    try:
        doc = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an llmc checkpoint (format {doc.get('format')!r}); "
                              "a Hugging Face directory must go through `llmc convert` first")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this llmc supports "
                              f"({CHECKPOINT_FORMAT_VERSION}); upgrade llmc")
    files = [path / f for f in doc.get("weights", [])]
    missing = [f.name for f in files if not f.is_file()]
    if missing or not files:
        raise CheckpointError(f"{path}: weight file(s) missing: {missing or 'none listed'}; re-run `llmc convert`")
    return Checkpoint(path, ModelConfig.from_dict(doc["model"]), QuantConfig.from_dict(doc.get("quantization")),
                      files, doc.get("source", {}))


def copy_tokenizer(src: Path | None, dst: Path) -> None:
    if src is not None and src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
