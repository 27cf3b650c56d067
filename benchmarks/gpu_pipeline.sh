#!/usr/bin/env bash
# One device call (issues 6 and 8): GPU tests, synthetic Llama-2-7B engines, decode latency, throughput.
#   1. GPU tests (TESTS=0 skips; GPU_TESTS picks the files, GPU_K a -k expression; GPU_MARK= also runs the unmarked tests
#      that pick CUDA when there is one).
#   2. Synthetic Llama-2-7B weights (random, bf16) -> engines named in QUANTS: none (bf16), fp8, fp8kv (fp8
#      weights + fp8 KV cache), nonekv (bf16 + fp8 KV cache); --max-batch-size $MAXB (default 64); --no-tune
#      unless NOTUNE= (empty), which builds tuned and prints what the tuner timed.
#   3. decode ms/token (DL_SET names, below): batch 1 and 64, pipelined or synchronous, fused or unfused ops,
#      with the device-busy time per step (torch profiler) so host gaps show; HF transformers eager at batch 1.
#   4. `llmc bench throughput` (TP_SET entries ENGINE[+kvfp8]@BATCH[:INxOUT[:N]], e.g. fp8@64 or
#      fp8+kvfp8@256:2048x2048:128 (+kvfp8: --kv-cache-dtype fp8 at load; +ne: --scheduler-policy
#      guaranteed_no_evict); default 128x128 and 512 requests);
#      HF generate_batch (HF_SET entries INxOUT:N).
#   5. attention kernels alone (KBENCH_SET: ';'-separated argument lists of benchmarks/kernels.py, e.g.
#      "--quick --decode-only --sweep --kv-dtype fp8 --decode-shapes 64x256,256x256"), after the tests.
#   6. GEMMs / GEMV alone (QGEMM_ARGS: arguments of benchmarks/quant_gemm_bench.py), after the kernels; before
#      them, Nsight Compute on single GEMM launches (NCU_SET: ';'-separated benchmarks/gemv_profile.py argument
#      lists; NCU_KERNEL: the kernel-name regex, default gemv), each report also as $OUT/ncu_N.txt.
# Subsets: TESTS=0 BUILD=0 DECODE=0 THROUGHPUT=0 HF_TP=0 skip parts; ORDER="throughput decode" runs throughput first;
# XDIST=N runs the GPU tests in N pytest-xdist workers (Triton compiles are CPU-bound; the image has xdist).
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

if [ "${BITS:-0}" = 1 ]; then
  timeout 120 python3 benchmarks/fusion_bits.py > "$R/fusion_bits.json" 2>> "$R/err.log"
  python3 -c "import json; [print(c['op'], c['width'], c['method'], {k: v for k, v in c.items() if k.startswith('vs')})
for c in json.load(open('$R/fusion_bits.json'))['cases']]" | tee -a "$OUT/summary.txt"; el "fusion bits"
fi
if [ "${TESTS:-1}" = 1 ]; then
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -v -p no:cacheprovider ${XDIST:+-n $XDIST} ${GPU_MARK--m gpu} \
    ${GPU_TESTS:-tests/test_pipeline.py tests/test_gpu.py} ${GPU_K:+-k "$GPU_K"} 2>&1 \
    | tee "$R/gpu_tests_full.log" | tail -25 > "$R/gpu_tests.log"; tail -8 "$R/gpu_tests.log" | tee -a "$OUT/summary.txt"
  el "gpu tests"
fi
i=0
IFS=';' read -r -a KB <<< "${KBENCH_SET:-}"
for kargs in "${KB[@]}"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  timeout "${KBENCH_TIMEOUT:-240}" python3 benchmarks/kernels.py $kargs > "$R/kernels_$i.json" 2> "$R/kernels_$i.err"
  python3 - "$R/kernels_$i.json" "$kargs" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(print("kernels", sys.argv[2], "no result", e))
print("kernels", sys.argv[2], "| copy GB/s", round(d.get("copy", {}).get("GBps_read_plus_write", 0)))
for k, v in d.items():
    if k.startswith(("decode_", "prefill_")):
        print(f"  {k}: " + " ".join(f"{a}={round(b, 4) if isinstance(b, float) else b}" for a, b in v.items()))
for k, v in d.get("sweep", {}).items():
    rows = sorted((r for r in v["variants"] if "ms" in r or "llmc_ms" in r), key=lambda r: r.get("ms", r.get("llmc_ms")))
    print(f"  sweep {k}: best {v['best']} | " + " ".join(
        f"{'/'.join(str(x) for x in list(r.values())[:-1])}={r.get('ms', r.get('llmc_ms')):.4f}" for r in rows[:12]))
PY
  el "kernels $i"
done
i=0
IFS=';' read -r -a NC <<< "${NCU_SET:-}"
for nargs in "${NC[@]}"; do  # Nsight Compute on one GEMM launch (benchmarks/gemv_profile.py arguments)
  i=$((i + 1))
  # shellcheck disable=SC2086
  timeout "${NCU_TIMEOUT:-120}" ncu --clock-control none --kernel-name regex:"${NCU_KERNEL:-gemv}" --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats \
    python3 benchmarks/gemv_profile.py $nargs > "$R/ncu_$i.txt" 2>&1
  { echo "ncu $nargs"; grep -E "DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Stall|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Waves Per SM|Grid Size|Block Size" "$R/ncu_$i.txt" | head -40; } | tee -a "$OUT/summary.txt"
  cp "$R/ncu_$i.txt" "$OUT/ncu_$i.txt" 2>/dev/null
  el "ncu $i"
done
if [ -n "${QGEMM_ARGS:-}" ]; then  # e.g. QGEMM_ARGS="--rows 1,2,4 --sweep": benchmarks/quant_gemm_bench.py
  # shellcheck disable=SC2086
  timeout "${QGEMM_TIMEOUT:-240}" python3 benchmarks/quant_gemm_bench.py $QGEMM_ARGS > "$R/qgemm.json" 2> "$R/qgemm.err"
  python3 - "$R/qgemm.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
dec = json.JSONDecoder()
text, i, parts = open(sys.argv[1]).read(), 0, []
while i < len(text):  # one JSON object per section
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text):
        obj, i = dec.raw_decode(text, i)
        parts.append(obj)
for d in parts:
    if "copy_GBps" in d:
        print("qgemm copy GB/s", round(d["copy_GBps"]))
    for shape, row in d.get("gemm", {}).items():
        print(f"  {shape}: " + " ".join(f"{m}={r['us']:.1f}us/{r['GBps']:.0f}" if "us" in r else f"{m}=ERR" for m, r in row.items()))
    for name, sw in d.get("sweep", {}).items():
        first = (sw.get("first") or {}).get("us_total")
        print(f"  sweep {name}: default {sw['default_us_total']} first {first} | top5 {[(r['cfg'], round(r['us_total'], 1)) for r in sw['top5']]}")
        if sw["best"]:
            print(f"    best per shape: {sw['best_per_shape']} | best overall per shape: {sw['best']['us']}")
PY
  el "qgemm"
fi
[ "${BUILD:-1}" = 1 ] || QUANTS=" "  # BUILD=0: no checkpoint, no engines (kernel benchmarks and tests only)
# SHAPE (default llama-2-7b) picks the synthetic model; other shapes' engines are /tmp/en-SHAPE-QUANT, so a
# TP_SET entry names them as e.g. llama-3-8b-fp8+kvfp8@512.
SHAPE=${SHAPE:-llama-2-7b}
if [ "$SHAPE" = llama-2-7b ]; then CK=/tmp/ck7b; EN=/tmp/en-; else CK=/tmp/ck-$SHAPE; EN=/tmp/en-$SHAPE-; fi
if [ "${BUILD:-1}" = 1 ] && [ ! -d $CK ]; then
  python3 benchmarks/synthetic_ckpt.py "$SHAPE" $CK > /dev/null 2>> "$R/err.log"
  el "checkpoint $SHAPE"
fi
for q in ${QUANTS:-none fp8}; do
  case $q in
    none) flags="" ;;
    nonekv) flags="--kv-cache-dtype fp8" ;;
    fp8kv) flags="--quant fp8 --kv-cache-dtype fp8" ;;
    *) flags="--quant $q" ;;
  esac
  # shellcheck disable=SC2086
  [ -f $EN$q/engine.json ] || timeout 300 python3 -m llmc.cli build $CK -o $EN$q --device cuda \
    --max-seq-len 4096 --max-batch-size "${MAXB:-64}" ${NOTUNE---no-tune} $flags > "$R/build-${EN#/tmp/}$q.log" 2>&1
  el "build $q rc=$?"
  python3 - $EN$q/engine.json <<'PY' | tee -a "$OUT/summary.txt"
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
# the GEMV's tiles for 8-bit weights before the pipelined K loop (seventh session)
Q8_UNPIPED="--tactic gemv.q8_stages=1 --tactic gemv.q8_block_n=4 --tactic gemv.q8_block_k=256 --tactic gemv.q8_num_warps=8 --tactic gemv.q8_x_vector=0"
declare -A DLARGS=(
  [bf16_b1]="/tmp/en-none --batch 1 --steps 128 --hf"
  [bf16_b1_sync]="/tmp/en-none --batch 1 --steps 128 --no-async-scheduling"
  [bf16_b64]="/tmp/en-none --batch 64 --steps 64 --profile"
  [bf16_b64_sync]="/tmp/en-none --batch 64 --steps 64 --profile --no-async-scheduling"
  [bf16_b1_unfused]="/tmp/en-none --batch 1 --steps 128 --profile --no-fuse rope_write_kv"
  [bf16_b1_nonormfuse]="/tmp/en-none --batch 1 --steps 128 --profile --no-fuse norm_gemv"
  [bf16_b1_normfuse]="/tmp/en-none --batch 1 --steps 128 --profile --fuse norm_gemv"
  [bf16_b1_prof]="/tmp/en-none --batch 1 --steps 128 --profile"
  [bf16_b1_unpiped]="/tmp/en-none --batch 1 --steps 128 --profile --tactic gemv.stages=1 --tactic gemv.block_k=512 --tactic gemv.x_vector=0"
  [fp8_b1_fp32]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.q8_half=0"
  [fp8_b1_aqloop]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic quant_gemm.act_quant_row=0"
  [fp8_b1_h2k]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.h8_block_k=2048"
  [fp8_b1_h16]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.h8_block_n=16"
  [fp8_b1_h8w]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.h8_num_warps=8"
  [fp8_b1_h4]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.h8_block_n=4"
  [fp8_b1_hst3]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.h8_stages=3"
  [fp8_b1_hst6]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.h8_stages=6"
  [fp8_b1_hst5]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.h8_stages=5"
  [fp8_b1_tl]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.h8_tail_first=0"
  [fp8_b1_gu16]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.per_shape.22016x4096.block_n=16"
  [fp8_b1_down4]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.per_shape.4096x11008.block_n=4"
  [fp8_b1_o4]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.per_shape.4096x4096.block_n=4"
  [fp8_b1_dst3]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic triton_kernels.decode_num_stages=3"
  [bf16_b1_noswiglu]="/tmp/en-none --batch 1 --steps 128 --profile --no-fuse swiglu_gemv"
  [int8_b1_noswiglu]="/tmp/en-int8 --batch 1 --steps 128 --profile --no-fuse swiglu_gemv"
  [bf16_b1_tf]="/tmp/en-none --batch 1 --steps 128 --profile --tactic gemv.tail_first=1"
  [int8_b1_tf]="/tmp/en-int8 --batch 1 --steps 128 --profile --tactic gemv.tail_first=1"
  [fp8_b1_split1]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic triton_kernels.decode_num_splits=1"
  [bf16_b1_split1]="/tmp/en-none --batch 1 --steps 128 --profile --tactic triton_kernels.decode_num_splits=1"
  [fp8_b1_unpiped]="/tmp/en-fp8 --batch 1 --steps 128 --profile $Q8_UNPIPED --tactic gemv.q8_half=0"
  [int8_b1_unpiped]="/tmp/en-int8 --batch 1 --steps 128 --profile $Q8_UNPIPED"
  [bf16_b1_nogemv]="/tmp/en-none --batch 1 --steps 128 --profile --tactic gemv.max_m=0"
  [fp8_b1_nogemv]="/tmp/en-fp8 --batch 1 --steps 128 --profile --tactic gemv.q8_max_m=0"
  [int8_b1_nogemv]="/tmp/en-int8 --batch 1 --steps 128 --profile --tactic gemv.q8_max_m=0"
  [bf16_b1_hf]="/tmp/en-none --batch 1 --steps 128 --profile --hf"
  [fp8_b1]="/tmp/en-fp8 --batch 1 --steps 128 --profile"
  [fp8_b1_unfused]="/tmp/en-fp8 --batch 1 --steps 128 --profile --no-fuse rope_write_kv --no-fuse act_quant"
  [fp8_b64]="/tmp/en-fp8 --batch 64 --steps 64 --profile"
  [fp8_b64_unfused]="/tmp/en-fp8 --batch 64 --steps 64 --profile --no-fuse rope_write_kv --no-fuse act_quant"
  [fp8kv_b64]="/tmp/en-fp8kv --batch 64 --steps 64 --profile"
  [fp8kv_b256]="/tmp/en-fp8kv --batch 256 --steps 32 --profile"
  [fp8_b256]="/tmp/en-fp8 --batch 256 --steps 32 --profile"
  [fp8_kvfp8_b256]="/tmp/en-fp8 --batch 256 --steps 32 --profile --kv-cache-dtype fp8"
  [fp8_kvfp8_b64]="/tmp/en-fp8 --batch 64 --steps 64 --profile --kv-cache-dtype fp8"
  [fp8_kvfp8_b1]="/tmp/en-fp8 --batch 1 --steps 128 --profile --kv-cache-dtype fp8"
  [fp8kv_b1]="/tmp/en-fp8kv --batch 1 --steps 128 --profile"
  [int8_b1]="/tmp/en-int8 --batch 1 --steps 128 --profile"
  [int4_b1]="/tmp/en-int4 --batch 1 --steps 128 --profile"
  [bf16_b1_nopdl]="/tmp/en-none --batch 1 --steps 128 --profile --no-pdl"
  [bf16_b1_noprefetch]="/tmp/en-none --batch 1 --steps 128 --profile --tactic gemv.prefetch=0"
  [fp8_b1_nopdl]="/tmp/en-fp8 --batch 1 --steps 128 --profile --no-pdl"
  [int8_b1_nopdl]="/tmp/en-int8 --batch 1 --steps 128 --profile --no-pdl"
  [int4_b1_nopdl]="/tmp/en-int4 --batch 1 --steps 128 --profile --no-pdl"
  [fp8_b1_mma_evensplit]="/tmp/en-fp8 --batch 1 --steps 128 --tactic gemv.q8_max_m=0 --tactic quant_gemm.uneven_split=0"
  [fp8_b1_mma]="/tmp/en-fp8 --batch 1 --steps 128 --tactic gemv.q8_max_m=0"
  [fp8_b64_evensplit]="/tmp/en-fp8 --batch 64 --steps 64 --tactic quant_gemm.uneven_split=0"
  [fp8_b64_plain]="/tmp/en-fp8 --batch 64 --steps 64"
  [bf16_b64_nopdl]="/tmp/en-none --batch 64 --steps 64 --profile --no-pdl"
  [int4_b1_w3]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3"
  [int4_b1_w2]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=2"
  [int4_b1_w3n128]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_n=128"
  [int4_b1_w3n32]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_n=32"
  [int4_b1_w3st3]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_num_stages=3"
  [int4_b1_w3k1k]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=1024"
  [int4_b1_w3k2k]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=2048"
  [int4_b1_w3k2kw8]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=2048 --tactic quant_gemm.gemv_num_warps=8"
  [int4_b1_w3k1kw8]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=1024 --tactic quant_gemm.gemv_num_warps=8"
  [int4_b1_w3k1kn128w8]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=1024 --tactic quant_gemm.gemv_block_n=128 --tactic quant_gemm.gemv_num_warps=8"
  [int4_b1_w3k1kn32]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=1024 --tactic quant_gemm.gemv_block_n=32"
  [int4_b1_w2k1k]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=2 --tactic quant_gemm.gemv_block_k=1024"
  [int4_b1_w3k1kn16]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=1024 --tactic quant_gemm.gemv_block_n=16"
  [int4_b1_w3k2kn32]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=2048 --tactic quant_gemm.gemv_block_n=32"
  [int4_b1_w3k2kn16]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=2048 --tactic quant_gemm.gemv_block_n=16"
  [int4_b1_w3k1kn32w2]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=1024 --tactic quant_gemm.gemv_block_n=32 --tactic quant_gemm.gemv_num_warps=2"
  [int4_b1_w3k1kn32w8]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=1024 --tactic quant_gemm.gemv_block_n=32 --tactic quant_gemm.gemv_num_warps=8"
  [int4_b1_w3n32]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_n=32"
  [int4_b1_w3k2kn16w8]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=3 --tactic quant_gemm.gemv_block_k=2048 --tactic quant_gemm.gemv_block_n=16 --tactic quant_gemm.gemv_num_warps=8"
  [int4_b1_prev]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=2 --tactic quant_gemm.gemv_block_n=64 --tactic quant_gemm.gemv_block_k=512"
  [int4_b1_n8k4k]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_block_n=8 --tactic quant_gemm.gemv_block_k=4096"
  [int4_b1_n16k4k]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_block_n=16 --tactic quant_gemm.gemv_block_k=4096 --tactic quant_gemm.gemv_num_warps=8"
  [int4_b1_n16k2k]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_block_k=2048 --tactic quant_gemm.gemv_num_warps=4"
  [int4_b1_n32k4k]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_block_n=32"
  [int4_b1_k4kw4]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_num_warps=4"
  [int4_b1_bytes]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=0"
  [int4_b1_st3]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_num_stages=3"
  [int4_b1_128st3]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_num_stages=3 --tactic quant_gemm.gemv_block_n=128"
  [int4_b1_mma]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_max_m=0"
  [int4_b1_old]="/tmp/en-int4 --batch 1 --steps 128 --profile --tactic quant_gemm.gemv_words=0 --tactic quant_gemm.gemv_block_n=16 --tactic quant_gemm.gemv_block_k=1024")
tp() {  # tp ENGINE@BATCH[:INxOUT[:N]] [extra llmc bench flags]
  spec=$1; shift
  eng=${spec%%@*}; rest=${spec#*@}; batch=${rest%%:*}
  kvflag=""; neflag=""
  for _ in 1 2; do  # suffixes, either order: +kvfp8 (fp8 KV cache at load), +ne (guaranteed_no_evict admission)
    case $eng in
      *+kvfp8) eng=${eng%+kvfp8}; kvflag="--kv-cache-dtype fp8" ;;
      *+ne) eng=${eng%+ne}; neflag="--scheduler-policy guaranteed_no_evict" ;;
    esac
  done
  lens=128x128; n=${N:-512}
  case $rest in *:*) lens=${rest#*:}; case $lens in *:*) n=${lens#*:}; lens=${lens%%:*} ;; esac ;; esac
  name="${eng}${kvflag:+_kvfp8}${neflag:+_ne}_b${batch}_${lens}${1:+_sync}"
  timeout "${TP_TIMEOUT:-200}" python3 -m llmc.cli bench throughput "/tmp/en-$eng" -n "$n" --input-len "${lens%x*}" \
    --output-len "${lens#*x}" --device cuda --gpu-memory-utilization 0.9 --max-batch-size "$batch" $kvflag $neflag "$@" \
    -o "$R/tp_$name.json" > /dev/null 2>> "$R/err.log"
  python3 - "$R/tp_$name.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(print(sys.argv[1], "no result", e))
r, e = d["results"], d["engine"]
print(f'{sys.argv[1].split("/")[-1]}: {e["quantization"]} kv={e.get("kv_cache_dtype")} async={e.get("async_scheduling")} '
      f'out tok/s {r["output_tokens_per_s"]:.0f} total {r["total_tokens_per_s"]:.0f} elapsed {r["elapsed_s"]:.2f}s '
      f'TPOT p50 {r["tpot_ms"]["p50"]:.2f} ITL p50 {r["itl_ms"]["p50"]:.2f} p99 {r["itl_ms"]["p99"]:.2f} '
      f'TTFT p50 {r["ttft_ms"]["p50"]:.0f} steps {e["steps"]} preempted {e.get("num_preemptions")} '
      f'peak batch {e.get("peak_running")} startup {e["startup_s"]:.1f}s')
PY
  save
}
run_decode() {
  [ "${DECODE:-1}" = 1 ] || return 0
  for name in ${DL_SET:-bf16_b1 bf16_b1_sync bf16_b64 bf16_b64_sync fp8_b1 fp8_b64}; do
    # shellcheck disable=SC2086
    dl "$name" ${DLARGS[$name]}
  done
  el "decode"
}
run_throughput() {
  [ "${THROUGHPUT:-1}" = 1 ] || return 0
  for spec in ${TP_SET:-fp8@64 none@64}; do
    case $spec in
      *_sync) tp "${spec%_sync}" --no-async-scheduling ;;
      *) tp "$spec" ;;
    esac
  done
  el "throughput"
}
for part in ${ORDER:-decode throughput}; do "run_$part"; done
if [ "${HF_TP:-1}" = 1 ]; then
  for spec in ${HF_SET:-128x128:64}; do
    lens=${spec%%:*}; n=${spec#*:}
    timeout "${HF_TIMEOUT:-150}" python3 benchmarks/hf_throughput.py llama-2-7b -n "$n" --input-len "${lens%x*}" \
      --output-len "${lens#*x}" > "$R/hf_tp_$lens.json" 2>> "$R/err.log"
    python3 -c "import json; d=json.load(open('$R/hf_tp_$lens.json')); print('hf generate_batch $lens n=$n', d.get('output_tokens_per_s'), d.get('elapsed_s'), d.get('error'))" | tee -a "$OUT/summary.txt"
  done
  el "hf throughput"
fi
tail -5 "$R/err.log" 2>/dev/null
el "done"
