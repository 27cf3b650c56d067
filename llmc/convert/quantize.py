"""Quantize a float llmc checkpoint into a quantized one (``--quant int8|int4|int4-awq|fp8|w8a8``).

Activation-aware methods (AWQ, SmoothQuant) run llmc's own float model over calibration text and record
per-input-channel statistics at each fused projection (qkv, o, gate_up, down); the input scale chosen for a
fused group is therefore one vector shared by its parts, as the engine layout requires.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from llmc.config import QuantConfig
from llmc.convert.checkpoint import ShardWriter, load_checkpoint, write_config
from llmc.errors import ConfigError
from llmc.models import quant_linear as ql

PROJ_GROUPS = {  # fused engine module -> checkpoint projections
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
AWQ_GRID = 11


# ---------------------------------------------------------------------------- calibration data
def default_calibration_text() -> tuple[str, str]:
    """English prose that needs no download: the first half of Python's own documentation topics
    (``pydoc_data.topics``, PSF license). The second half is held out for evaluation."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return "\n\n".join(topics[k] for k in keys[: len(keys) // 2]), "pydoc_data.topics (first half of topics, PSF license)"


def heldout_eval_text() -> tuple[str, str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return "\n\n".join(topics[k] for k in keys[len(keys) // 2:]), "pydoc_data.topics (second half, PSF license)"


def read_calibration_file(path: str) -> str:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        lines = [json.loads(line).get("text", "") for line in text.splitlines() if line.strip()]
        text = "\n\n".join(lines)
    if not text.strip():
        raise ConfigError(f"--calib-data {path}: no text found")
    return text


# ---------------------------------------------------------------------------- float model for calibration
def float_model(ckpt):
    """llmc's model with the checkpoint's float weights (fused, as the builder lays them out)."""
    from llmc.build.builder import engine_tensors
    from llmc.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(ckpt.config, None, torch.float32)
    params = dict(model.named_parameters())
    for name, t in engine_tensors(ckpt.tensors(), ckpt.config.num_hidden_layers):
        params[name].data.copy_(t)
    return model.eval()


@torch.inference_mode()
def forward_tokens(model, ids: list[int]) -> torch.Tensor:
    """Logits ``[len(ids), vocab]`` of one sequence through a throwaway paged cache."""
    from llmc.plugins.metadata import AttentionMetadata

    cfg, bs = model.config, 16
    nb = -(-len(ids) // bs)
    kv = [(torch.zeros(nb, bs, model.layers[0].self_attn.num_kv_heads, cfg.head_dim),
           torch.zeros(nb, bs, model.layers[0].self_attn.num_kv_heads, cfg.head_dim)) for _ in model.layers]
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(nb))], bs)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), kv, meta)
    return model.compute_logits(hidden)


def collect_stats(model, windows: list[list[int]], max_rows: int = 512) -> dict[str, dict[str, torch.Tensor]]:
    """Per fused module: mean |x| and max |x| per input channel, and a row sample for the AWQ search."""
    stats: dict[str, dict] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        for mod_name in PROJ_GROUPS:
            mod = layer.get_submodule(mod_name)
            key = f"layers.{i}.{mod_name}"

            def hook(_m, inputs, _o, key=key):
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                s = stats.setdefault(key, {"sum": 0, "n": 0, "max": None, "rows": []})
                s["sum"] = s["sum"] + x.abs().sum(0)
                s["n"] += x.shape[0]
                m = x.abs().amax(0)
                s["max"] = m if s["max"] is None else torch.maximum(s["max"], m)
                if sum(r.shape[0] for r in s["rows"]) < max_rows:
                    s["rows"].append(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:64]])

            hooks.append(mod.register_forward_hook(hook))
    try:
        for w in tqdm(windows, desc="calibrate", unit="window"):
            forward_tokens(model, w)
    finally:
        for h in hooks:
            h.remove()
    return {k: {"mean": v["sum"] / v["n"], "max": v["max"], "rows": torch.cat(v["rows"])[:max_rows]}
            for k, v in stats.items()}


# ---------------------------------------------------------------------------- per-method quantization
def awq_scale(w: torch.Tensor, st: dict, group: int) -> tuple[torch.Tensor, float]:
    """Search s = mean|x|^alpha (alpha on a grid) minimising the fused layer's output error on the sample."""
    x = st["rows"]
    ref = x @ w.T
    best, best_s, best_a = math.inf, torch.ones(w.shape[1]), 0.0
    for a in torch.linspace(0, 1, AWQ_GRID).tolist():
        s = st["mean"].clamp(min=1e-5) ** a
        s = s / (s.max() * s.min()).sqrt()
        q, sc, z = ql.quantize_int4_groupwise(w * s, group)
        wq = ((q.float().reshape(w.shape[0], -1, group) - z.float()[..., None]) * sc[..., None]).reshape(w.shape)
        err = ((x / s) @ wq.T - ref).pow(2).mean().item()
        if err < best:
            best, best_s, best_a = err, s, a
    return best_s, best_a


def smooth_scale(w: torch.Tensor, st: dict, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant: migrate activation outliers into the weights, s = max|x|^a / max|w|^(1-a)."""
    wmax = w.abs().amax(0).clamp(min=1e-5)
    return (st["max"].clamp(min=1e-5) ** alpha / wmax ** (1 - alpha)).clamp(min=1e-5)


def quantize_projection(method: str, w: torch.Tensor, group: int, input_scale: torch.Tensor | None) -> dict:
    w = w.float()
    if input_scale is not None:
        w = w * input_scale  # the forward divides the input by the same vector
    if method == "int8" or method == "w8a8":
        q, s = ql.quantize_int8_per_channel(w)
        out = {"qweight": q, "scales": s}
    elif method in ("int4", "int4-awq"):
        q, s, z = ql.quantize_int4_groupwise(w, group)
        out = {"qweight": ql.pack_int4(q), "scales": s, "zeros": z}
    elif method == "fp8":
        q, s = ql.quantize_fp8_per_channel(w)
        out = {"qweight": q, "scales": s}
    else:
        raise ConfigError(f"unknown quantization method {method!r}")
    if input_scale is not None:
        out["input_scale"] = input_scale.float().clone()  # one copy per part: safetensors refuses shared storage
    return out


def quantize_checkpoint(src: str | Path, out: str | Path, method: str, group_size: int = 128,
                        calib_data: str | None = None, calib_samples: int = 64, calib_seq_len: int = 256) -> Path:
    ckpt = load_checkpoint(src)
    if ckpt.quant.enabled:
        raise ConfigError(f"{src} is already quantized ({ckpt.quant.method})")
    cfg = ckpt.config
    group = group_size if method in ("int4", "int4-awq") else None
    if group:
        bad = [d for d in (cfg.hidden_size, cfg.intermediate_size, cfg.q_size) if d % group]
        if bad:
            raise ConfigError(f"--group-size {group} does not divide the model's input dims {bad}; use 32 or 64")
    calibration: dict = {}
    stats = None
    if method in ("int4-awq", "w8a8"):
        from transformers import AutoTokenizer

        if ckpt.tokenizer_dir is None:
            raise ConfigError(f"{method} calibrates on text and needs the checkpoint's tokenizer")
        text, source = (read_calibration_file(calib_data), calib_data) if calib_data else default_calibration_text()
        ids = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir)).encode(text)
        windows = [ids[i:i + calib_seq_len] for i in range(0, len(ids) - calib_seq_len + 1, calib_seq_len)]
        windows = windows[:calib_samples]
        if not windows:
            raise ConfigError(f"calibration text has {len(ids)} tokens, fewer than --calib-seq-len {calib_seq_len}")
        stats = collect_stats(float_model(ckpt), windows)
        calibration = {"source": source, "samples": len(windows), "seq_len": calib_seq_len}
    state = ckpt.state_dict()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    writer = ShardWriter(out)
    alphas = []
    quantized: set[str] = set()
    for i in tqdm(range(cfg.num_hidden_layers), desc=f"quantize {method}", unit="layer"):
        for fused, parts in PROJ_GROUPS.items():
            names = [f"model.layers.{i}.{p}.weight" for p in parts]
            ws = [state[n] for n in names]
            scale = None
            if stats is not None:
                st = stats[f"layers.{i}.{fused}"]
                full = torch.cat([w.float() for w in ws])
                if method == "int4-awq":
                    scale, a = awq_scale(full, st, group)
                    alphas.append(a)
                else:
                    scale = smooth_scale(full, st)
            for n, w in zip(names, ws):
                base = n.removesuffix(".weight")
                for suffix, t in quantize_projection(method, w, group, scale).items():
                    writer.add(f"{base}.{suffix}", t)
                quantized.add(n)
    for n, t in state.items():
        if n not in quantized:
            writer.add(n, t)  # embeddings, norms, LM head, biases stay in float
    files = writer.close()
    if alphas:
        calibration["awq_alpha_mean"] = sum(alphas) / len(alphas)
    if method == "w8a8":
        calibration["smoothquant_alpha"] = 0.5
    qcfg = QuantConfig(method=method, bits=4 if group else 8, group_size=group, calibration=calibration or None)
    if ckpt.tokenizer_dir is not None:
        shutil.copytree(ckpt.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    write_config(out, cfg, qcfg, {**ckpt.source, "quantized_from": str(src)}, files)
    return out
