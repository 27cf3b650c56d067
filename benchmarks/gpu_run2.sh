#!/usr/bin/env bash
# Second device call: decode latency at several batch sizes, max-load throughput (issue 8), and speculative
# decoding speedup vs acceptance (oracle proposer) and with a draft engine (issue 7), all on synthetic
# Llama-2-7B-shaped weights. Results in $OUT.
set -u
OUT=${OUT:-/tmp/llmc-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source benchmarks/synthetic_engines.sh
for b in 1 16 64; do
  python3 benchmarks/decode_latency.py /tmp/en7b --batch $b --steps 64 > "$OUT/decode_b$b.json" 2>> "$OUT/err.log"
  python3 -c "import json,sys; d=json.load(open('$OUT/decode_b$b.json')); print('batch', $b, 'ms/step', round(d['llmc']['ms_per_step'],2), 'floor', round(d['floor_ms'],2), 'frac', round(d['llmc']['fraction_of_floor'],3), 'tok/s', round(d['llmc']['tokens_per_s']))"
done
python3 -m llmc.cli bench throughput /tmp/en7b -n 512 --input-len 128 --output-len 128 --device cuda \
  --gpu-memory-utilization 0.9 -o "$OUT/throughput_128_128.json" 2>&1 | tail -15
python3 benchmarks/spec_decode.py oracle /tmp/en7b --k 4 --max-tokens 128 --alphas 0,0.5,0.7,0.8,0.9,1 \
  > "$OUT/spec_oracle.json" 2>> "$OUT/err.log"; cat "$OUT/spec_oracle.json"
python3 benchmarks/spec_decode.py draft /tmp/en7b --draft /tmp/end --k 4 --max-tokens 64 \
  > "$OUT/spec_draft.json" 2>> "$OUT/err.log"; cat "$OUT/spec_draft.json"
tail -20 "$OUT/err.log"
