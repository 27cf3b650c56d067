"""The engine format (DESIGN.md "Engine"): ``engine.json`` + weights in the runtime's layout + ``tokenizer/``.

An engine records what it was built for (device, compute capability, limits, tactics); ``load_engine``
refuses one from a newer format or tuned for another GPU, saying what to do instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.config import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, BuildConfig, ModelConfig, QuantConfig
from llmc.errors import CheckpointError, EngineVersionError


@dataclass
class Engine:
    path: Path
    model: ModelConfig
    quant: QuantConfig
    build: BuildConfig
    target: dict[str, Any]
    weights: list[Path]
    tactics: dict[str, Any] = field(default_factory=dict)
    llmc_version: str = ""
    speculative: dict[str, Any] | None = None

    @property
    def tokenizer_dir(self) -> Path | None:
        d = self.path / "tokenizer"
        return d if d.is_dir() and any(d.iterdir()) else None

    def rank_weights(self, rank: int) -> list[Path]:
        """Weight files for one tensor-parallel rank (files are named ``rank{r}*.safetensors``)."""
        return [w for w in self.weights if w.name.startswith(f"rank{rank}-")]


def current_cuda_target() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"device": "cuda", "device_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def write_engine_json(path: Path, doc: dict[str, Any]) -> None:
    doc = {"format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION, **doc}
    (path / "engine.json").write_text(json.dumps(doc, indent=2) + "\n")


def load_engine(path: str | Path, device: str | None = None) -> Engine:
    """Read and check ``engine.json``; ``device`` is where it will run ('cpu'/'cuda', None = don't check)."""
    path = Path(path)
    f = path / "engine.json"
    if not f.is_file():
        hint = " (this is a checkpoint: run `llmc build` on it first)" if (path / "config.json").is_file() else ""
        raise CheckpointError(f"{path}: not an llmc engine, no engine.json{hint}")
    try:
        doc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); rebuild the engine with `llmc build`") from None
    if doc.get("format") != ENGINE_FORMAT:
        raise CheckpointError(f"{path}: engine.json is not an llmc engine (format {doc.get('format')!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or version != ENGINE_FORMAT_VERSION:
        newer = isinstance(version, int) and version > ENGINE_FORMAT_VERSION
        raise EngineVersionError(
            f"{path}: engine format version {version} {'is newer than' if newer else 'differs from'} this llmc's "
            f"({ENGINE_FORMAT_VERSION}); {'upgrade llmc' if newer else 'rebuild it'} or rebuild the engine with "
            f"`llmc build CHECKPOINT -o {path}`")
    target = doc.get("target", {})
    if device == "cuda" and target.get("device") == "cuda":
        here = current_cuda_target()
        if here and here["compute_capability"] != target.get("compute_capability"):
            raise EngineVersionError(
                f"{path}: engine was built and tuned for {target.get('device_name')} (compute capability "
                f"{target.get('compute_capability')}) but this GPU is {here['device_name']} "
                f"({here['compute_capability']}); rebuild it here with `llmc build CHECKPOINT -o DIR --device cuda`")
    weights = [path / w for w in doc.get("weights", [])]
    missing = [w.name for w in weights if not w.is_file()]
    if missing or not weights:
        raise CheckpointError(f"{path}: engine weight file(s) missing: {missing or 'none listed'}; rebuild the engine")
    return Engine(path=path, model=ModelConfig.from_dict(doc["model"]),
                  quant=QuantConfig.from_dict(doc.get("quantization")), build=BuildConfig.from_dict(doc["build"]),
                  target=target, weights=weights, tactics=doc.get("tactics", {}),
                  llmc_version=doc.get("llmc_version", ""), speculative=doc.get("speculative"))
