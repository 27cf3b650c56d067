"""Host time of incremental detokenization per generated token (stop strings on), the per-token work a
server does for every stream on top of the engine step.

    python benchmarks/detokenize.py TOKENIZER_DIR [--streams 20] [--tokens 190]

TOKENIZER_DIR is any Hugging Face tokenizer folder, e.g. an engine's ``tokenizer/``. Streams are windows of
one encoded English + multi-byte text. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmc.runtime.detokenizer import IncrementalDetokenizer, fast_decoder  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Über naïve café — 東京 🚀 42."


def main() -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tokenizer")
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=190, help="generated tokens per stream")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    ids = tok.encode(TEXT)
    width = a.tokens + 10
    if len(ids) < width + 1:
        sys.exit(f"the sample text has {len(ids)} tokens; ask for fewer than {len(ids) - 10} per stream")
    streams = [ids[i:i + width] for i in range(0, len(ids) - width, 37)][:a.streams]
    n = 0
    t0 = time.perf_counter()
    for s in streams:
        d = IncrementalDetokenizer(tok, s[:10], stop=["zzz"])
        for t in s[10:]:
            d.add(t)
            d.take_delta(False)
            n += 1
    dt = time.perf_counter() - t0
    print(json.dumps({"tokenizer": a.tokenizer, "class": type(tok).__name__,
                      "fast_path": fast_decoder(tok) is not None, "tokens": n,
                      "us_per_token": round(dt / n * 1e6, 2)}, indent=1))


if __name__ == "__main__":
    main()
