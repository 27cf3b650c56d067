#!/usr/bin/env bash
# Device call: every GPU-marked kernel test, then the attention and quantized-GEMM kernel benchmarks
# (with their tactic sweeps). Results in $OUT.
set -u
OUT=${OUT:-/tmp/llmc-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
TESTS=${TESTS:-tests/test_quant_gemm.py tests/test_triton_kernels.py tests/test_gpu.py tests/test_quantization.py}
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu $TESTS 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
timeout 240 python3 benchmarks/quant_gemm_bench.py ${QG_ARGS:---sweep} > "$OUT/quant_gemm.json" 2>> "$OUT/err.log"
python3 - "$OUT/quant_gemm.json" <<'PY'
import json, sys
dec = json.JSONDecoder()
text, docs = open(sys.argv[1]).read(), []
while text.strip():
    d, end = dec.raw_decode(text.strip()); docs.append(d); text = text.strip()[end:]
for d in docs:
    for k, row in d.get("gemm", {}).items():
        print(k, " ".join(f"{m}={r['us']:.1f}us/{r['GBps']:.0f}GB/s" if "us" in r else f"{m}=ERR" for m, r in row.items()))
    for m, r in d.get("sweep", {}).items():
        print("sweep", m, r["keys"], r["best"], "default", r["default_us_total"])
PY
[ "${ATTN:-1}" = 1 ] && timeout 120 python3 benchmarks/kernels.py --quick > "$OUT/kernels.json" 2>> "$OUT/err.log"
tail -c 1500 "$OUT/kernels.json"; tail -5 "$OUT/err.log" 2>/dev/null
