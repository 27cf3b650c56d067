"""``llmc build``: checkpoint -> engine. Renames tensors to the runtime module's names, fuses QKV and
gate/up projections (concatenation along the output dim, which every quantized layout allows), records
the limits and target, and copies the tokenizer.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from llmc import __version__
from llmc.build.engine import current_cuda_target, load_engine, write_engine_json
from llmc.config import BuildConfig, QuantConfig
from llmc.convert.checkpoint import ShardWriter, load_checkpoint
from llmc.build.sharding import check_shardable, shard_tensor, tp_layout
from llmc.convert.hf_reader import count_tensors
from llmc.errors import ConfigError
from llmc.plugins.kv_layout import kv_storage_dtype

FUSED = {  # fused engine module -> its checkpoint parts, in concatenation order
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_PART_TO_FUSED = {part: (fused, i) for fused, parts in FUSED.items() for i, part in enumerate(parts)}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)\.(\w+)")


def shared_input_tensors() -> set[str]:
    """Per-input-channel tensors (smoothing / AWQ scales) that all parts of a fused group share."""
    try:
        from llmc.models.quant_linear import SHARED_INPUT_TENSORS
    except ImportError:
        return set()
    return set(SHARED_INPUT_TENSORS)


def engine_tensors(ckpt_tensors: Iterable[tuple[str, torch.Tensor]], num_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint (HF) names -> engine (module) names, fusing projections one layer at a time."""
    shared = shared_input_tensors()
    pending: dict[tuple[int, str, str], dict[int, torch.Tensor]] = {}
    for name, t in ckpt_tensors:
        m = _LAYER_RE.fullmatch(name)
        if m and m.group(2) in _PART_TO_FUSED:
            layer, part, suffix = int(m.group(1)), m.group(2), m.group(3)
            fused, idx = _PART_TO_FUSED[part]
            key = (layer, fused, suffix)
            parts = pending.setdefault(key, {})
            parts[idx] = t
            if len(parts) == len(FUSED[fused]):
                del pending[key]
                ordered = [parts[i] for i in range(len(parts))]
                if suffix in shared:
                    if any(not torch.equal(ordered[0], p) for p in ordered[1:]):
                        raise ConfigError(f"layer {layer}: {suffix} differs across the parts of {fused}; "
                                          "the quantizer must compute it jointly")
                    fused_t = ordered[0]
                else:
                    fused_t = torch.cat(ordered, dim=0)
                yield f"layers.{layer}.{fused}.{suffix}", fused_t
            continue
        yield name.removeprefix("model."), t
    if pending:
        (layer, fused, suffix), _ = next(iter(pending.items()))
        raise ConfigError(f"layer {layer}: incomplete parts for {fused}.{suffix} in the checkpoint")


def build(ckpt_dir: str | Path, out: str | Path, cfg: BuildConfig | None = None, quant: str | None = None,
          tune: bool = True, **quant_options) -> Path:
    """Build an engine from a checkpoint; with ``quant``, quantize an unquantized checkpoint first. With
    ``cfg.device == 'cuda'`` and ``tune``, time kernel variants on this GPU and store the winners."""
    cfg = cfg or BuildConfig()
    out = Path(out)
    ckpt = load_checkpoint(ckpt_dir)
    if quant and quant != "none":
        QuantConfig(method=quant)
        if ckpt.quant.enabled:
            raise ConfigError(f"{ckpt_dir} is already quantized ({ckpt.quant.method}); build it without --quant")
        check_shardable(ckpt.config, True, cfg.tp_size)  # refuse tp>1 before spending time quantizing
        from llmc.convert.quantize import quantize_checkpoint

        with tempfile.TemporaryDirectory(prefix="llmc-quant-") as tmp:
            quantize_checkpoint(ckpt_dir, tmp, quant, **quant_options)
            return build(tmp, out, cfg, tune=tune)
    model = ckpt.config
    if cfg.max_seq_len > model.max_position_embeddings:
        raise ConfigError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's context "
                          f"({model.max_position_embeddings}); lower it")
    if cfg.max_num_tokens < cfg.max_batch_size:
        raise ConfigError(f"--max-num-tokens ({cfg.max_num_tokens}) must be >= --max-batch-size "
                          f"({cfg.max_batch_size}) so every running sequence can decode in one step")
    target: dict = {"device": "cpu"}
    tactics: dict = {}
    if cfg.device == "cuda":
        here = current_cuda_target()
        if here is None:
            raise ConfigError("--device cuda needs a CUDA GPU on the build machine; build on the serving GPU")
        target = here
        kv_storage_dtype(cfg.kv_cache_dtype, "cuda")  # refuses fp8 on a GPU that cannot convert it
    check_shardable(model, ckpt.quant.enabled, cfg.tp_size)
    if cfg.device == "cuda" and tune:
        from llmc.build.tuning import tune as tune_kernels

        tactics = tune_kernels(model, cfg, ckpt.quant)

    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").unlink(missing_ok=True)
    writers = [ShardWriter(out, prefix=f"rank{r}") for r in range(cfg.tp_size)]
    layouts = [tp_layout(model, r, cfg.tp_size) for r in range(cfg.tp_size)]
    source = tqdm(ckpt.tensors(), total=count_tensors(ckpt.files), desc="build: pack weights", unit="tensor")
    for name, t in engine_tensors(source, model.num_hidden_layers):
        if cfg.tp_size == 1:
            writers[0].add(name, t)
            continue
        for w, lay in zip(writers, layouts):
            w.add(name, shard_tensor(name, t, model, lay).clone())
    files = [f for w in writers for f in w.close()]
    tok = out / "tokenizer"
    if tok.exists():
        shutil.rmtree(tok)
    if ckpt.tokenizer_dir is not None:
        shutil.copytree(ckpt.tokenizer_dir, tok)
    write_engine_json(out, {
        "llmc_version": __version__,
        "model": model.to_dict(),
        "quantization": ckpt.quant.to_dict() if ckpt.quant.enabled else None,
        "build": cfg.to_dict(),
        "target": target,
        "backend": "torch",
        "tactics": tactics,
        "weights": files,
    })
    load_engine(out)
    return out
