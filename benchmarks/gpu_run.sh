#!/usr/bin/env bash
# One device call: GPU tests, kernel benchmarks, and batch-1 decode of a synthetic Llama-2-7B-shaped
# engine beside Hugging Face transformers. Results go to $OUT (the device tool brings them back).
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_run.sh [quick]
set -u
OUT=${OUT:-/tmp/llmc-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
[ -f benchmarks/kernels.py ] && python3 benchmarks/kernels.py > "$OUT/kernels.json" 2> "$OUT/kernels.err"; tail -3 "$OUT/kernels.err" 2>/dev/null
[ "${1:-}" = quick ] && exit 0
python3 benchmarks/synthetic_ckpt.py llama-2-7b /tmp/ck7b 2>/dev/null
python3 -m llmc.cli build /tmp/ck7b -o /tmp/en7b --device cuda --max-seq-len 4096 --max-batch-size 64 2>/dev/null
python3 benchmarks/decode_latency.py /tmp/en7b --hf --profile > "$OUT/decode_bf16.json" 2> "$OUT/decode_bf16.err"
tail -3 "$OUT/decode_bf16.err"
cat "$OUT/decode_bf16.json"
