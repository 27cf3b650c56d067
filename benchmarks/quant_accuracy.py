"""SmolLM2-135M perplexity and greedy top-1 agreement for every quantization method, plus bundle sizes.

    python benchmarks/quant_accuracy.py [--tokens 6000] [--workdir /tmp/quant] > docs/quant_accuracy.json

Evaluation text: the second half of Python's documentation topics (``pydoc_data.topics``, PSF license),
shipped with every CPython. Calibration (int4-awq, w8a8) uses llmc's default, text sampled from the model
itself, which shares nothing with the evaluation text; two extra rows calibrate on the *first* half of the
pydoc topics instead (``--calib-data``) to show what in-domain calibration buys. INT4 uses group 64 (and 32):
SmolLM2's hidden size 576 is not a multiple of the default 128. Runs on the CPU (float32 compute).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from llmc.build.builder import build  # noqa: E402
from llmc.config import BuildConfig  # noqa: E402
from llmc.convert import convert  # noqa: E402
from llmc.convert.quantize import heldout_eval_text, pydoc_text, quantize_checkpoint  # noqa: E402
from llmc.runtime.perplexity import agreement, encode, evaluate  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sizes(ckpt: Path) -> dict:
    """Whole checkpoint directory, its weight files, and the projection tensors alone (MiB)."""
    mib = 2 ** 20
    linear = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for n in sf.keys():
                if any(f".{p}." in n for p in PROJ):
                    t = sf.get_tensor(n)
                    linear += t.numel() * t.element_size()
    return {"dir_MiB": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / mib,
            "weights_MiB": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / mib,
            "projections_MiB": linear / mib}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=6000, help="Evaluation tokens (from the start of the text).")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--workdir", default="/tmp/quant")
    a = ap.parse_args()
    w = Path(a.workdir)
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bcfg = BuildConfig(max_seq_len=1024, max_batch_size=4, max_num_tokens=512)
    f32 = convert("smollm2-135m", w / "ckpt-f32", dtype="float32")
    bf16 = convert("smollm2-135m", w / "ckpt-bf16", dtype="bfloat16")
    base = build(f32, w / "eng-f32", bcfg)
    text, source = heldout_eval_text()
    ids = encode(base, text, a.tokens)
    calib_file = w / "pydoc-first-half.txt"
    calib_file.write_text(pydoc_text(0)[0], encoding="utf-8")

    ref = evaluate(base, ids, a.window, a.stride, desc="float32")
    ref_preds = ref.pop("predictions")
    rows = [{"method": "float32", "label": "float32 (baseline)", **ref, **sizes(f32)},
            {"method": "bfloat16", "label": "bfloat16 checkpoint (size only)", **sizes(bf16)}]
    runs = [  # (label, method, options)
        ("int8 (W8A16)", "int8", {}),
        ("fp8 (W8A8 dynamic)", "fp8", {}),
        ("w8a8 SmoothQuant", "w8a8", {}),
        ("int4 RTN g64", "int4", {"group_size": 64}),
        ("int4-awq g64", "int4-awq", {"group_size": 64}),
        ("int4 RTN g32", "int4", {"group_size": 32}),
        ("int4-awq g32", "int4-awq", {"group_size": 32}),
        ("w8a8 SmoothQuant, pydoc-calibrated", "w8a8", {"calib_data": str(calib_file)}),
        ("int4-awq g64, pydoc-calibrated", "int4-awq", {"group_size": 64, "calib_data": str(calib_file)}),
    ]
    for i, (label, method, opts) in enumerate(runs):
        t = time.time()
        ck = quantize_checkpoint(f32, w / f"ckpt-{i}", method, **opts)
        qt = time.time() - t
        eng = build(ck, w / f"eng-{i}", bcfg)
        r = evaluate(eng, ids, a.window, a.stride, desc=label)
        calib = json.loads((ck / "config.json").read_text())["quantization"]["calibration"]
        rows.append({"method": method, "label": label, **{k: v for k, v in r.items() if k != "predictions"},
                     "ppl_vs_baseline": r["ppl"] / ref["ppl"] - 1,
                     "top1_agreement": agreement(r["predictions"], ref_preds), **sizes(ck),
                     "quantize_seconds": qt, "calibration": calib})
    print(json.dumps({"text": source, "tokens_requested": a.tokens, "window": a.window, "stride": a.stride,
                      "torch": torch.__version__, "python": platform.python_version(),
                      "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                      "seconds": time.time() - t0, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
