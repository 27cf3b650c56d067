"""``llmc convert``: an HF directory or GGUF file -> an llmc checkpoint (optionally quantized)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from llmc.config import QuantConfig
from llmc.convert.checkpoint import (TORCH_DTYPES, ShardWriter, expected_tensor_names, load_checkpoint,
                                     write_config)
from llmc.convert.resolve import resolve_model
from llmc.errors import CheckpointError, ConfigError


def convert(model: str, out: str | Path, dtype: str = "auto", allow_pickle: bool = False,
            quant: str | None = None, **quant_options) -> Path:
    """Convert ``model`` (path or alias) into an llmc checkpoint at ``out``; returns ``out``.

    With ``quant``, a float checkpoint is written to a temporary directory first and then quantized
    (calibration needs the whole model), so ``convert --quant`` and ``build --quant`` share one path.
    """
    out = Path(out)
    if dtype not in ("auto", *TORCH_DTYPES):
        raise ConfigError(f"--dtype must be auto, {', '.join(TORCH_DTYPES)}; got {dtype!r}")
    if quant and quant != "none":
        QuantConfig(method=quant)  # validate the name before any work
        from llmc.convert.quantize import quantize_checkpoint

        with tempfile.TemporaryDirectory(prefix="llmc-float-", dir=out.parent if out.parent.exists() else None) as tmp:
            convert(model, tmp, dtype=dtype, allow_pickle=allow_pickle)
            return quantize_checkpoint(tmp, out, quant, **quant_options)
    src = resolve_model(model)
    want = None if dtype == "auto" else dtype
    if src.kind == "gguf":
        from llmc.convert.gguf_reader import iter_gguf_tensors, read_gguf, save_gguf_tokenizer

        cfg, reader = read_gguf(src.path, want)
        tensors, total = iter_gguf_tensors(reader, cfg), len(reader.tensors)

        def save_tokenizer(d: Path) -> None:
            save_gguf_tokenizer(src.path, d)
    else:
        from llmc.convert.hf_reader import count_tensors, hf_name, iter_tensors, read_hf

        cfg, files = read_hf(src.path, want, allow_pickle)
        tensors = ((hf_name(n), t) for n, t in iter_tensors(files))
        total = count_tensors(files)

        def save_tokenizer(d: Path) -> None:
            _save_hf_tokenizer(src.path, d)

    expected = expected_tensor_names(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # the config is written last: a crash never leaves a valid-looking dir
    writer = ShardWriter(out)
    torch_dtype = TORCH_DTYPES[cfg.dtype]
    seen: set[str] = set()
    for name, t in tqdm(tensors, total=total, desc=f"convert {src.path.name}", unit="tensor"):
        if name is None or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue  # tied models sometimes save the head anyway; the embedding is the truth
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} for a {cfg.model_type} model; is the config right?")
        writer.add(name, t.to(torch_dtype))
        seen.add(name)
    missing = expected - seen
    if missing:
        raise CheckpointError(f"checkpoint incomplete: {len(missing)} tensor(s) missing, e.g. {sorted(missing)[0]!r}")
    files = writer.close()
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    save_tokenizer(tok_dir)
    write_config(out, cfg, QuantConfig(), {"model": src.name, "kind": src.kind, "path": str(src.path)}, files)
    load_checkpoint(out)  # validate what we wrote
    return out


def _save_hf_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer through transformers (normalises the files); absent tokenizer = ids-only engine."""
    if not any((src / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise CheckpointError(f"{src}: tokenizer files present but unreadable ({e})") from None
    tok.save_pretrained(str(dst))

