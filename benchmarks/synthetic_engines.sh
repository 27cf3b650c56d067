#!/usr/bin/env bash
# Build the synthetic engines the GPU scripts measure: /tmp/en7b (Llama-2-7B shape) and /tmp/end (a small
# draft with the same vocabulary). Sourced by gpu_run2.sh and gpu_run3.sh.
python3 benchmarks/synthetic_ckpt.py llama-2-7b /tmp/ck7b >/dev/null 2>&1
python3 -m llmc.cli build /tmp/ck7b -o /tmp/en7b --device cuda --max-seq-len 4096 --max-batch-size 64 >/dev/null 2>&1
rm -rf /tmp/ck7b
python3 benchmarks/synthetic_ckpt.py draft-llama2-vocab /tmp/ckd >/dev/null 2>&1
python3 -m llmc.cli build /tmp/ckd -o /tmp/end --device cuda --max-seq-len 4096 --max-batch-size 8 >/dev/null 2>&1
