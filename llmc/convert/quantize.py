"""Quantize a float llmc checkpoint into a quantized one (``--quant int8|int4|int4-awq|fp8|w8a8``).

The output is an ordinary llmc checkpoint: each projection ``model.layers.N.{self_attn,mlp}.X_proj`` is
stored as ``.qweight`` plus ``.scales`` (``.zeros``, ``.input_scale``) beside it, everything else (embeddings,
norms, LM head, biases) unchanged; docs/quantization.md has the layouts and formulas.

Activation-aware methods (AWQ, SmoothQuant) run llmc's own float model over calibration tokens and record
per-input-channel statistics at each *fused* projection (qkv, o, gate_up, down), so the input scale chosen
for a fused group is one vector shared by its parts, as the engine layout requires. Calibration tokens come
from ``--calib-data`` or, by default, from the model itself (temperature sampling from a few seed prompts):
no download, works for tokenizer-less checkpoints, and shares nothing with any evaluation text.
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

PROJ_GROUPS = {  # fused engine module -> checkpoint projections, in the builder's concatenation order
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
AWQ_ALPHAS = [i / 20 for i in range(21)]  # s = mean|x|^alpha, alpha in [0, 1]; alpha 0 is plain RTN
AWQ_CLIP_RATIOS = [1.0 - 0.05 * i for i in range(10)]  # per-group max-|w| shrink candidates, 1.0 .. 0.55
AWQ_NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # clipping q/k hurts attention scores (as in AWQ)
SMOOTHQUANT_ALPHA = 0.5
STAT_ROWS = 512  # activation rows kept per fused module for the AWQ searches
SEED_PROMPTS = (
    "The history of the city begins", "In mathematics, a group is", "Once upon a time, in a small village,",
    "The following article explains how", "Scientists have discovered that", "Dear friend, I am writing to",
    "def main():\n    ", "The recipe calls for", "Question: Why is the sky blue?\nAnswer:",
    "Chapter 1\n\nIt was a cold morning when", "The weather today", "Here is a list of the most important",
)


# ---------------------------------------------------------------------------- texts
def pydoc_text(part: int) -> tuple[str, str]:
    """Half ``part`` (0 or 1) of Python's documentation topics (``pydoc_data.topics``, PSF license), English
    prose that every CPython ships. Half 1 is llmc's held-out evaluation text; nothing calibrates on it."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = keys[: len(keys) // 2] if part == 0 else keys[len(keys) // 2:]
    which = "first" if part == 0 else "second"
    return "\n\n".join(topics[k] for k in half), f"pydoc_data.topics ({which} half of the topics, PSF license)"


def heldout_eval_text() -> tuple[str, str]:
    return pydoc_text(1)


def read_calibration_file(path: str | Path) -> str:
    """Plain text, or JSONL with a ``text`` field per line (samples joined by blank lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--calib-data {path}: cannot read it as UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        samples = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--calib-data {path}:{n}: not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ConfigError(f"--calib-data {path}:{n}: expected an object with a string 'text' field")
            samples.append(rec["text"])
        text = "\n\n".join(samples)
    if not text.strip():
        raise ConfigError(f"--calib-data {path}: no text found")
    return text


# ---------------------------------------------------------------------------- float model for calibration
class _Weights:
    """Name -> tensor over a checkpoint's safetensors files, read on demand (a layer at a time)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    self.where[name] = f

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as sf:
            return sf.get_tensor(name)


def float_model(ckpt):
    """llmc's model with the checkpoint's float weights (renamed and fused as the builder lays them out)."""
    from llmc.build.builder import engine_tensors
    from llmc.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(ckpt.config, None, torch.float32)
    params = dict(model.named_parameters())
    for name, t in engine_tensors(ckpt.tensors(), ckpt.config.num_hidden_layers):
        params[name].data.copy_(t)
    return model.eval()


def _kv_pool(model, num_blocks: int, block_size: int):
    """A float32 paged cache for calibration forwards on the CPU."""
    from llmc.plugins.kv_layout import allocate_kv_cache

    kvh, hd = model.layers[0].self_attn.num_kv_heads, model.config.head_dim
    return [allocate_kv_cache(num_blocks, block_size, kvh, hd, torch.float32, False, "cpu") for _ in model.layers]


@torch.inference_mode()
def forward_tokens(model, ids: list[int]) -> torch.Tensor:
    """Logits ``[len(ids), vocab]`` of one sequence through a throwaway paged cache."""
    from llmc.plugins.metadata import AttentionMetadata

    bs = 16
    nb = -(-len(ids) // bs)
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(nb))], bs)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), _kv_pool(model, nb, bs), meta)
    return model.compute_logits(hidden)


@torch.inference_mode()
def sample_from_model(model, prompts: list[list[int]], n: int, seq_len: int, seed: int = 0,
                      temperature: float = 0.8, top_k: int = 40, banned: list[int] = (),
                      batch: int = 16) -> list[list[int]]:
    """``n`` token sequences of ``seq_len`` sampled from the model itself (prompt ``i % len(prompts)``
    first), batched through the paged cache; ``banned`` tokens (EOS) are never drawn, so none ends early."""
    from llmc.plugins.metadata import AttentionMetadata

    gen = torch.Generator().manual_seed(seed)
    bs = 16
    nb = -(-seq_len // bs)
    out: list[list[int]] = []
    bar = tqdm(total=n * seq_len, desc="calibration: sample from the model", unit="tok")
    for first in range(0, n, batch):
        seqs = [list(prompts[i % len(prompts)][: seq_len - 1]) for i in range(first, min(n, first + batch))]
        bar.update(sum(len(s) for s in seqs))
        kv = _kv_pool(model, nb * len(seqs), bs)
        tables = [list(range(i * nb, (i + 1) * nb)) for i in range(len(seqs))]
        q_lens = [len(s) for s in seqs]  # the first step prefills each prompt
        active = list(range(len(seqs)))
        while active:
            ids = [t for i, ql_ in zip(active, q_lens) for t in seqs[i][len(seqs[i]) - ql_:]]
            pos = [p for i, ql_ in zip(active, q_lens) for p in range(len(seqs[i]) - ql_, len(seqs[i]))]
            meta = AttentionMetadata.build(q_lens, [len(seqs[i]) for i in active], [tables[i] for i in active], bs)
            hidden = model(torch.tensor(ids), torch.tensor(pos), kv, meta)
            last = torch.tensor(meta.query_start_loc_cpu[1:]) - 1
            logits = model.compute_logits(hidden[last]) / temperature
            if banned:
                logits[:, list(banned)] = -math.inf
            top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
            for i, t in zip(active, top.indices.gather(1, pick)[:, 0].tolist()):
                seqs[i].append(t)
            bar.update(len(active))
            active = [i for i in active if len(seqs[i]) < seq_len]
            q_lens = [1] * len(active)
        out += seqs
    bar.close()
    return out


def collect_stats(model, windows: list[list[int]], max_rows: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per fused module: mean |x| and max |x| per input channel over every token, and ``max_rows``
    (default ``STAT_ROWS``) activation rows drawn evenly from all windows for the AWQ searches."""
    max_rows = max_rows or STAT_ROWS
    stats: dict[str, dict] = {}
    per_window = max(1, -(-max_rows // len(windows)))
    gen = torch.Generator().manual_seed(0)
    hooks = []
    for i, layer in enumerate(model.layers):
        for mod_name in PROJ_GROUPS:
            key = f"layers.{i}.{mod_name}"

            def hook(_m, inputs, _o, key=key):
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                s = stats.setdefault(key, {"sum": 0, "n": 0, "max": None, "rows": []})
                s["sum"] = s["sum"] + x.abs().sum(0)
                s["n"] += x.shape[0]
                m = x.abs().amax(0)
                s["max"] = m if s["max"] is None else torch.maximum(s["max"], m)
                s["rows"].append(x[torch.randperm(x.shape[0], generator=gen)[:per_window]])

            hooks.append(layer.get_submodule(mod_name).register_forward_hook(hook))
    try:
        for w in tqdm(windows, desc="calibration: activation statistics", unit="window"):
            forward_tokens(model, w)
    finally:
        for h in hooks:
            h.remove()
    return {k: {"mean": v["sum"] / v["n"], "max": v["max"], "rows": torch.cat(v["rows"])[:max_rows]}
            for k, v in stats.items()}


_SAMPLED: dict[tuple, list[list[int]]] = {}


def calibration_windows(ckpt, calib_data: str | None, samples: int, seq_len: int, model) -> tuple[list[list[int]], str]:
    """Token windows to calibrate on and a sentence naming where they came from."""
    tok = None
    if ckpt.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
    if calib_data:
        if tok is None:
            raise ConfigError("--calib-data needs the checkpoint's tokenizer; this checkpoint has none "
                              "(leave --calib-data out to calibrate on text sampled from the model)")
        ids = tok.encode(read_calibration_file(calib_data))
        windows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
        if not windows:
            raise ConfigError(f"--calib-data {calib_data}: {len(ids)} tokens, fewer than --calib-seq-len {seq_len}")
        return windows, f"file {calib_data}"
    cfg = ckpt.config
    if tok is not None:
        prompts = [tok.encode(p) for p in SEED_PROMPTS]  # BOS only where the tokenizer adds one itself
        what = f"{len(SEED_PROMPTS)} seed prompts"
    else:
        prompts = [[cfg.bos_token_id if cfg.bos_token_id is not None else 0]]
        what = "the BOS token (no tokenizer)"
    key = (str(Path(ckpt.path).resolve()), (Path(ckpt.path) / "config.json").stat().st_mtime_ns, samples, seq_len)
    if key not in _SAMPLED:  # deterministic (seeded), so quantizing one checkpoint several ways samples once
        _SAMPLED.clear()
        _SAMPLED[key] = sample_from_model(model, prompts, samples, seq_len, banned=cfg.eos_token_id)
    windows = [list(w) for w in _SAMPLED[key]]
    return windows, f"sampled from the model itself (temperature 0.8, top-k 40, seed 0) from {what}"


# ---------------------------------------------------------------------------- scale searches
def awq_search(w: torch.Tensor, st: dict, group: int) -> tuple[torch.Tensor, float, float]:
    """AWQ scale search on a fused weight ``[N, K]``: ``s = mean|x|^alpha`` (normalised so that
    ``max(s) * min(s) = 1``), alpha on a grid, keeping the one whose INT4 layer output ``(x / s) Q(W s)^T``
    is closest (MSE) to ``x W^T`` on the sampled rows. Returns (s, alpha, best MSE / RTN MSE)."""
    x = st["rows"]
    ref = x @ w.T
    mean = st["mean"].clamp(min=1e-4)
    errs = []
    for a in AWQ_ALPHAS:
        s = mean ** a
        s = s / (s.max() * s.min()).sqrt()
        errs.append(((x / s) @ ql.fake_quant_int4(w * s, group).T - ref).pow(2).mean().item())
    best = min(range(len(errs)), key=errs.__getitem__)
    s = mean ** AWQ_ALPHAS[best]
    s = s / (s.max() * s.min()).sqrt()
    return s, AWQ_ALPHAS[best], errs[best] / max(errs[0], 1e-30)


def awq_clip(w: torch.Tensor, x: torch.Tensor, group: int, rows: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, float]:
    """AWQ's clipping search: per (output channel, input group) shrink the max |w| by the ratio that
    minimises that group's contribution to the output error on the sample ``x`` (already divided by s).
    Only rows where ``rows`` is true are clipped. Returns (clipped weight, mean chosen ratio)."""
    n, k = w.shape
    ng = k // group
    xg = x.reshape(-1, ng, group)
    out = w.clone()
    ratios = []
    for r0 in range(0, n, chunk):
        sel = rows[r0:r0 + chunk]
        if not sel.any():
            continue
        wg = w[r0:r0 + chunk].reshape(-1, ng, group)
        amax = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full(wg.shape[:2], math.inf)
        best_r = torch.ones(wg.shape[:2])
        for r in AWQ_CLIP_RATIOS:
            wc = torch.minimum(torch.maximum(wg, -amax * r), amax * r)
            wq = ql.fake_quant_int4(wc.reshape(-1, k), group).reshape(wg.shape)
            err = torch.einsum("tgj,ngj->tng", xg, wg - wq).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        best_r = torch.where(sel[:, None], best_r, torch.ones_like(best_r))
        m = amax * best_r[..., None]
        out[r0:r0 + chunk] = torch.minimum(torch.maximum(wg, -m), m).reshape(-1, k)
        ratios.append(best_r[sel])
    return out, (torch.cat(ratios).mean().item() if ratios else 1.0)


def smooth_scale(w: torch.Tensor, st: dict, alpha: float = SMOOTHQUANT_ALPHA) -> torch.Tensor:
    """SmoothQuant: migrate activation outliers into the weights, ``s = max|x|^a / max|W|^(1-a)`` per input
    channel (``W`` the fused weight, so one ``s`` serves every part)."""
    wmax = w.abs().amax(0).clamp(min=1e-5)
    return (st["max"].clamp(min=1e-5) ** alpha / wmax ** (1 - alpha)).clamp(min=1e-5)


# ---------------------------------------------------------------------------- per-projection storage
def quantize_projection(method: str, w: torch.Tensor, group: int | None) -> dict[str, torch.Tensor]:
    """Stored tensors for one projection weight ``[out, in]`` (already multiplied by any input scale)."""
    w = w.float()
    if method in ("int8", "w8a8"):
        q, s = ql.quantize_int8_per_channel(w)
        return {"qweight": q, "scales": s}
    if method in ("int4", "int4-awq"):
        q, s, z = ql.quantize_int4_groupwise(w, group)
        return {"qweight": ql.pack_int4(q), "scales": s, "zeros": z}
    if method == "fp8":
        q, s = ql.quantize_fp8_per_channel(w)
        return {"qweight": q, "scales": s}
    raise ConfigError(f"unknown quantization method {method!r}")


def dequantize_projection(method: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weight the stored tensors stand for (input scale undone), for error statistics."""
    if method in ("int4", "int4-awq"):
        w = ql.dequantize_int4(t["qweight"], t["scales"], t["zeros"])
    else:
        w = t["qweight"].float() * t["scales"][:, None]
    return w / t["input_scale"][None, :] if "input_scale" in t else w


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else {}


def quantize_checkpoint(src_ckpt_dir: str | Path, out_dir: str | Path, method: str, group_size: int = 128,
                        calib_data: str | None = None, calib_samples: int = 64, calib_seq_len: int = 256) -> Path:
    """Read the float checkpoint at ``src_ckpt_dir``, write a ``method``-quantized one at ``out_dir``."""
    QuantConfig(method=method)
    if method == "none":
        raise ConfigError("quantize_checkpoint: method 'none' has nothing to do")
    ckpt = load_checkpoint(src_ckpt_dir)
    if ckpt.quant.enabled:
        raise ConfigError(f"{src_ckpt_dir} is already quantized ({ckpt.quant.method}); quantize a float checkpoint")
    cfg = ckpt.config
    group = group_size if method in ("int4", "int4-awq") else None
    if group:
        bad = sorted({d for d in (cfg.hidden_size, cfg.intermediate_size, cfg.q_size) if d % group})
        if group <= 0 or group % 2 or bad:
            fits = [g for g in (128, 64, 32) if not any(d % g for d in (cfg.hidden_size, cfg.intermediate_size, cfg.q_size))]
            raise ConfigError(f"--group-size {group} does not divide the model's input dims {bad}; "
                              f"use {' or '.join(map(str, fits)) or 'a divisor of them'}")
    if calib_samples <= 0 or calib_seq_len <= 1:
        raise ConfigError("--calib-samples must be >= 1 and --calib-seq-len >= 2")

    calibration: dict = {}
    stats = None
    if method in ("int4-awq", "w8a8"):
        model = float_model(ckpt)
        windows, source = calibration_windows(ckpt, calib_data, calib_samples, calib_seq_len, model)
        stats = collect_stats(model, windows)
        del model
        calibration = {"source": source, "samples": len(windows), "seq_len": calib_seq_len,
                       "tokens": sum(len(w) for w in windows)}
    else:
        calibration = {"source": None, "samples": 0, "seq_len": None,
                       "note": "weight-only scales (and, for fp8, dynamic per-token activation scales): "
                               "no calibration data needed"}

    weights = _Weights(ckpt.files)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # written last: a crash never leaves a valid-looking dir
    writer = ShardWriter(out)
    rel_errs: dict[str, float] = {}
    alphas, mse_ratios, clip_ratios, s_min, s_max = [], [], [], [], []
    quantized: set[str] = set()
    for i in tqdm(range(cfg.num_hidden_layers), desc=f"quantize {method}", unit="layer"):
        for fused, parts in PROJ_GROUPS.items():
            names = [f"model.layers.{i}.{p}.weight" for p in parts]
            ws = [weights[n].float() for n in names]
            full = torch.cat(ws)
            scale = None
            if method == "int4-awq":
                st = stats[f"layers.{i}.{fused}"]
                scale, a, ratio = awq_search(full, st, group)
                alphas.append(a)
                mse_ratios.append(ratio)
                clip_rows = torch.cat([torch.full((w.shape[0],), p not in AWQ_NO_CLIP) for p, w in zip(parts, ws)])
                full, r = awq_clip(full * scale, st["rows"] / scale, group, clip_rows)
                clip_ratios.append(r)
            elif method == "w8a8":
                scale = smooth_scale(full, stats[f"layers.{i}.{fused}"])
                full = full * scale
                s_min.append(scale.min().item())
                s_max.append(scale.max().item())
            for n, w_orig, w in zip(names, ws, full.split([w.shape[0] for w in ws])):
                base = n.removesuffix(".weight")
                tensors = quantize_projection(method, w, group)
                if scale is not None:
                    tensors["input_scale"] = scale.float().clone()  # a copy per part: identical values
                rel_errs[base] = ((dequantize_projection(method, tensors) - w_orig).norm() / w_orig.norm().clamp(min=1e-12)).item()
                for suffix, t in tensors.items():
                    writer.add(f"{base}.{suffix}", t)
                quantized.add(n)
    for n in weights.where:
        if n not in quantized:
            writer.add(n, weights[n])  # embeddings, norms, LM head, biases stay in float
    files = writer.close()

    worst = max(rel_errs, key=rel_errs.get)
    stats_out: dict = {"weight_rel_error": {**_summary(list(rel_errs.values())), "worst_tensor": worst}}
    if method == "int4-awq":
        stats_out.update(awq_alpha=_summary(alphas), awq_output_mse_vs_rtn=_summary(mse_ratios),
                         awq_clip_ratio=_summary(clip_ratios))
    if method == "w8a8":
        stats_out.update(smoothquant_alpha=SMOOTHQUANT_ALPHA, smooth_scale_min=min(s_min), smooth_scale_max=max(s_max))
    calibration["method_stats"] = stats_out
    qcfg = QuantConfig(method=method, bits=4 if group else 8, group_size=group, calibration=calibration)
    tok = out / "tokenizer"
    if tok.exists():
        shutil.rmtree(tok)
    if ckpt.tokenizer_dir is not None:
        shutil.copytree(ckpt.tokenizer_dir, tok)
    write_config(out, cfg, qcfg, {**ckpt.source, "quantized_from": str(src_ckpt_dir)}, files)
    load_checkpoint(out)
    return out
