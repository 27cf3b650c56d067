#!/usr/bin/env bash
# Device call: batch-1 decode of the Llama-2-7B shape (synthetic random weights) in bf16 and each quantized
# format, beside Hugging Face transformers (eager bf16) in the same run; one JSON per format in $OUT.
# QUANTS picks the formats (default "none int8 int4 fp8"); each engine is built, measured on the otherwise
# idle GPU and deleted before the next (KEEP="none fp8" keeps those). THROUGHPUT="none fp8" then runs
# `llmc bench throughput` (512 requests, 128 in / 128 out, max batch 64) on the kept engines.
set -u
OUT=${OUT:-/tmp/llmc-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
QUANTS=${QUANTS:-none int8 int4 fp8}
STEPS=${STEPS:-128}
t0=$(date +%s)
[ -d /tmp/ck7b ] || python3 benchmarks/synthetic_ckpt.py llama-2-7b /tmp/ck7b >/dev/null 2>> "$OUT/err.log"
echo "checkpoint $(( $(date +%s) - t0 )) s"
for q in $QUANTS; do  # one engine on disk at a time (the 64 GB disk holds the checkpoint and two engines)
  flags=""; [ "$q" != none ] && flags="--quant $q"
  python3 -m llmc.cli build /tmp/ck7b -o /tmp/en-$q --device cuda --max-seq-len 4096 --max-batch-size 64 $flags \
     > "/tmp/build-$q.log" 2>&1; echo "build $q rc=$? $(( $(date +%s) - t0 )) s"
  hf=""; [ "$q" = none ] && hf="--hf"
  python3 benchmarks/decode_latency.py /tmp/en-$q --batch 1 --steps $STEPS $hf --profile \
    > "$OUT/decode_$q.json" 2>> "$OUT/err.log" || tail -5 "/tmp/build-$q.log" >> "$OUT/err.log"
  case " ${KEEP:-} " in *" $q "*) ;; *) rm -rf /tmp/en-$q ;; esac
  python3 - "$OUT/decode_$q.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(print(sys.argv[1], "no result", e))
l = d["llmc"]
print(d["quant"], "weights GB", round(d["weight_GB"], 2), "ms/step", round(l["ms_per_step"], 3), "floor", round(d["floor_ms"], 3),
      "frac", round(l["fraction_of_floor"], 3), "tok/s", round(l["tokens_per_s"], 1), "startup", round(d["startup_s"], 1),
      "capture", round(d["graph_capture_s"], 1), "hf_ms", d.get("hf_transformers", {}).get("ms_per_step"))
for r in d.get("profile", [])[:8]:
    print("   ", round(r["device_ms_per_step"], 3), r["calls"], r["name"])
PY
done
for q in ${THROUGHPUT:-}; do
  python3 -m llmc.cli bench throughput /tmp/en-$q -n 512 --input-len 128 --output-len 128 --device cuda \
    --gpu-memory-utilization 0.9 -o "$OUT/throughput_$q.json" 2>> "$OUT/err.log" | tail -12
done
echo "total $(( $(date +%s) - t0 )) s"; tail -8 "$OUT/err.log" 2>/dev/null
