"""SmolLM2-135M perplexity and greedy top-1 agreement for every quantization method, plus bundle sizes.

    python benchmarks/quant_accuracy.py [--tokens 6000] [--group-size 64] [--workdir /tmp/quant]

Text: the held-out half of Python's pydoc topics (``pydoc_data.topics``, PSF license); calibration uses the
other half. Group size 64 because SmolLM2's hidden size (576) is not a multiple of 128.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmc.build.builder import build  # noqa: E402
from llmc.config import BuildConfig  # noqa: E402
from llmc.convert import convert  # noqa: E402
from llmc.convert.quantize import heldout_eval_text, quantize_checkpoint  # noqa: E402
from llmc.runtime.perplexity import perplexity  # noqa: E402


def dir_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/quant")
    a = ap.parse_args()
    w = Path(a.workdir)
    bcfg = BuildConfig(max_seq_len=1024, max_batch_size=4, max_num_tokens=512)
    f32 = convert("smollm2-135m", w / "ckpt-f32", dtype="float32")
    bf16 = convert("smollm2-135m", w / "ckpt-bf16", dtype="bfloat16")
    base = build(f32, w / "eng-f32", bcfg)
    from transformers import AutoTokenizer

    text, source = heldout_eval_text()
    ids = AutoTokenizer.from_pretrained(str(base / "tokenizer")).encode(text)[: a.tokens]
    rows = [{"method": "float32 (baseline)", **perplexity(base, ids), "checkpoint_MiB": dir_mb(f32)},
            {"method": "bfloat16 checkpoint (size only)", "checkpoint_MiB": dir_mb(bf16)}]
    for m in ("int8", "int4", "int4-awq", "fp8", "w8a8"):
        ck = quantize_checkpoint(f32, w / f"ckpt-{m}", m, group_size=a.group_size)
        eng = build(ck, w / f"eng-{m}", bcfg)
        r = perplexity(eng, ids, reference_engine=base)
        rows.append({"method": m, **r, "ppl_vs_baseline": r["ppl"] / rows[0]["ppl"] - 1, "checkpoint_MiB": dir_mb(ck)})
    print(json.dumps({"text": source, "tokens": a.tokens, "group_size": a.group_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
