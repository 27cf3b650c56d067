"""Read a local Hugging Face model directory: config, safetensors (sharded or not), tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from llmc.config import ModelConfig
from llmc.errors import CheckpointError


def read_hf_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None


def weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth")))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{path}: only pickle weights ({pickles[0].name}) found; pickle can run arbitrary code. Convert them to "
            "safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)")
    if not pickles:
        raise CheckpointError(f"{path}: no *.safetensors weight files found")
    return pickles


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every file, one at a time (bounded memory)."""
    from safetensors import safe_open

    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():
                        yield name, sf.get_tensor(name)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e}); re-download it") from None
        else:
            try:
                state = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot load pickle weights safely ({e})") from None
            yield from state.items()


def count_tensors(files: list[Path]) -> int | None:
    from safetensors import safe_open

    n = 0
    for f in files:
        if f.suffix != ".safetensors":
            return None
        try:
            with safe_open(str(f), framework="pt") as sf:
                n += len(list(sf.keys()))
        except Exception as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e}); re-download it") from None
    return n


def hf_name(name: str) -> str | None:
    """Checkpoint tensor names are HF's; drop buffers HF sometimes saves (rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name


def read_hf(path: Path, dtype: str | None, allow_pickle: bool = False):
    cfg = ModelConfig.from_hf(read_hf_config(path), dtype=dtype)
    files = weight_files(path, allow_pickle)
    return cfg, files
