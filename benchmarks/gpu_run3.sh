#!/usr/bin/env bash
# Third device call: speculative decoding on synthetic Llama-2-7B weights: speedup at batch 1 against a
# controlled acceptance rate (oracle proposer, float32 compute: see spec_decode.py --dtype), and end to end
# with a synthetic draft engine.
set -u
OUT=${OUT:-/tmp/llmc-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source benchmarks/synthetic_engines.sh
python3 benchmarks/spec_decode.py oracle /tmp/en7b --k 4 --max-tokens 96 --dtype float32 --alphas 0,0.5,0.7,0.8,0.9,1 \
  > "$OUT/spec_oracle_fp32.json" 2>> "$OUT/err.log"; cat "$OUT/spec_oracle_fp32.json"
python3 benchmarks/spec_decode.py draft /tmp/en7b --draft /tmp/end --k 4 --max-tokens 64 \
  > "$OUT/spec_draft.json" 2>> "$OUT/err.log"; cat "$OUT/spec_draft.json"
tail -5 "$OUT/err.log"
