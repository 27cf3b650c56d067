#!/usr/bin/env bash
# Device call (issues 6 and 8): pipelined steps (async scheduling) on the GPU, before/after in one run.
#   1. GPU tests of the pipeline and of graphs/eager/CPU agreement.
#   2. Synthetic Llama-2-7B weights (random, bf16) -> bf16 and fp8 engines (--no-tune by default: the default
#      tactics, the H100 sweep's winners; NOTUNE= builds tuned and prints what the tuner timed).
# Subsets: TESTS=0 DECODE=0 THROUGHPUT=0 HF_TP=0 skip parts; QUANTS, DL_SET, TP_SET pick runs by name.
#   3. decode ms/token at batch 1 and 64, pipelined and synchronous, with the device-busy time per step
#      (torch profiler) so host gaps show; Hugging Face transformers eager at batch 1.
#   4. `llmc bench throughput` 128/128 x 512 (fp8 and bf16), pipelined and synchronous; HF generate_batch.
# Everything lands in $OUT/results.tar.gz plus $OUT/summary.txt (the device tool returns at most 8 files).
set -u
OUT=${OUT:-/tmp/llmc-out}
R=/tmp/llmc-results
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
save() { tar czf "$OUT/results.tar.gz" -C "$R" . 2>/dev/null; }  # after every measurement: a killed run keeps its results
el() { save; echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)" | tee -a "$R/gpu.txt"

if [ "${TESTS:-1}" = 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_pipeline.py tests/test_gpu.py 2>&1 \
    | tail -15 > "$R/gpu_tests.log"; tail -3 "$R/gpu_tests.log"; el "gpu tests"
fi
[ -d /tmp/ck7b ] || python3 benchmarks/synthetic_ckpt.py llama-2-7b /tmp/ck7b > /dev/null 2>> "$R/err.log"
el "checkpoint"
for q in ${QUANTS:-none fp8}; do
  flags=""; [ "$q" != none ] && flags="--quant $q"
  [ -f /tmp/en-$q/engine.json ] || timeout 300 python3 -m llmc.cli build /tmp/ck7b -o /tmp/en-$q --device cuda \
    --max-seq-len 4096 --max-batch-size 64 ${NOTUNE---no-tune} $flags > "$R/build-$q.log" 2>&1
  el "build $q rc=$?"
  python3 - /tmp/en-$q/engine.json <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
t = json.load(open(sys.argv[1])).get("tactics", {})
for f in t.get("tuning", {}).get("families", []):
    times = " ".join(f"{c['cfg']}={c['ms']:.4f}" for c in f["candidates"] if "ms" in c)
    print(f"tuned {f['family']}: winner {f['winner']} {f['winner_ms']:.4f} ms (default {f['default_ms']}) | {times[:400]}")
PY
done

summ() {  # one line per decode_latency JSON
  python3 - "$1" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(print(sys.argv[1], "no result", e))
l = d["llmc"]; prof = {r["name"]: r["device_ms_per_step"] for r in d.get("profile", [])}
busy = prof.get("ALL DEVICE WORK (sum of kernels and copies)")
print(f'{sys.argv[1].split("/")[-1]}: {d["quant"]} batch {d["batch"]} async={d["async_scheduling"]} '
      f'ms/step {l["ms_per_step"]:.3f} floor {d["floor_ms"]:.3f} frac {l["fraction_of_floor"]:.3f} '
      f'tok/s {l["tokens_per_s"]:.0f} device-busy {busy if busy is None else round(busy, 3)} '
      f'bw {d["bandwidth_GBps"]:.0f} GB/s startup {d["startup_s"]:.1f}s capture {d["graph_capture_s"]:.1f}s '
      f'hf {d.get("hf_transformers", {}).get("ms_per_step")}')
PY
}
dl() {
  name=$1; shift
  timeout 150 python3 benchmarks/decode_latency.py "$@" > "$R/dl_$name.json" 2>> "$R/err.log"
  summ "$R/dl_$name.json" | tee -a "$OUT/summary.txt"; save
}
declare -A DLARGS=(
  [bf16_b1]="/tmp/en-none --batch 1 --steps 128 --hf"
  [bf16_b1_sync]="/tmp/en-none --batch 1 --steps 128 --no-async-scheduling"
  [bf16_b64]="/tmp/en-none --batch 64 --steps 64 --profile"
  [bf16_b64_sync]="/tmp/en-none --batch 64 --steps 64 --profile --no-async-scheduling"
  [fp8_b1]="/tmp/en-fp8 --batch 1 --steps 128 --profile"
  [fp8_b64]="/tmp/en-fp8 --batch 64 --steps 64 --profile")
if [ "${DECODE:-1}" = 1 ]; then
  for name in ${DL_SET:-bf16_b1 bf16_b1_sync bf16_b64 bf16_b64_sync fp8_b1 fp8_b64}; do
    # shellcheck disable=SC2086
    dl "$name" ${DLARGS[$name]}
  done
  el "decode"
fi
tp() {
  name=$1; eng=$2; shift 2
  timeout 200 python3 -m llmc.cli bench throughput "$eng" -n "${N:-512}" --input-len "${IN:-128}" \
    --output-len "${OUTLEN:-128}" --device cuda --gpu-memory-utilization 0.9 "$@" -o "$R/tp_$name.json" \
    > /dev/null 2>> "$R/err.log"
  python3 - "$R/tp_$name.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(print(sys.argv[1], "no result", e))
r, e = d["results"], d["engine"]
print(f'{sys.argv[1].split("/")[-1]}: {e["quantization"]} async={e.get("async_scheduling")} out tok/s '
      f'{r["output_tokens_per_s"]:.0f} total {r["total_tokens_per_s"]:.0f} elapsed {r["elapsed_s"]:.2f}s '
      f'TPOT p50 {r["tpot_ms"]["p50"]:.2f} ITL p50 {r["itl_ms"]["p50"]:.2f} p99 {r["itl_ms"]["p99"]:.2f} '
      f'TTFT p50 {r["ttft_ms"]["p50"]:.0f} steps {e["steps"]} startup {e["startup_s"]:.1f}s')
PY
  save
}
if [ "${THROUGHPUT:-1}" = 1 ]; then
  for name in ${TP_SET:-fp8 fp8_sync bf16 bf16_sync}; do
    case $name in
      fp8) tp fp8 /tmp/en-fp8 ;;
      fp8_sync) tp fp8_sync /tmp/en-fp8 --no-async-scheduling ;;
      bf16) tp bf16 /tmp/en-none ;;
      bf16_sync) tp bf16_sync /tmp/en-none --no-async-scheduling ;;
    esac
  done
  el "throughput"
fi
if [ "${HF_TP:-1}" = 1 ]; then
  timeout 150 python3 benchmarks/hf_throughput.py llama-2-7b -n "${HF_N:-128}" > "$R/hf_tp.json" 2>> "$R/err.log"
  python3 -c "import json; d=json.load(open('$R/hf_tp.json')); print('hf generate_batch', d.get('output_tokens_per_s'), d.get('elapsed_s'), d.get('error'))" | tee -a "$OUT/summary.txt"
  el "hf throughput"
fi
tail -5 "$R/err.log" 2>/dev/null
el "done"
