#!/usr/bin/env bash
# One device call: serving latency of `llmc serve` under Poisson load (`llmc bench serve`), on a synthetic
# Llama-2-7B-shaped bf16 engine: start-up time (engine load + CUDA graph capture, launch -> /health OK), then
# TTFT / TPOT / ITL / goodput at several request rates and at a fixed maximum concurrency.
#
# On the GPU machine (repo root, the device tool's carry [".whl"]):  bash benchmarks/gpu_serve.sh
# .whl/ holds the wheels the image lacks (fastapi, starlette, uvicorn, pydantic, pydantic-core,
# annotated-types, typing-inspection, opentelemetry-api, typing-extensions>=4.16 for pydantic-core).
#
# Results in $OUT (default /tmp/llmc-out), four files: serve_summary.json (one row per rate),
# serve_runs.json (every `bench serve` JSON in full), serve.log (this script's log and the bench tables),
# server.log (the server's log).
#
# Per-token timing of a tokenizer-less (synthetic) engine needs llmc serve to stream a chunk per token even
# when it adds no text (llmc/serve/app.py, completion_stream).
#
# Everything is overridable, e.g. a CPU dry run on the demo SmolLM2-135M engine (`make demo` builds one; WHEELS
# pointing at the same wheels for this machine's Python, or WHEELS=none where they are installed):
#   ENGINE=.cache/demo/engine DEVICE=cpu RATES="1 2 inf" NUM_PROMPTS=8 MAX_CONC=4 OUT=/tmp/llmc-out-dry \
#     bash benchmarks/gpu_serve.sh
# or a synthetic engine built on the spot: ENGINE=/tmp/entiny SYNTHETIC=1 SYNTH_SHAPE=tiny BUILD_MAX_SEQ_LEN=2048 ...
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llmc-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

ENGINE=${ENGINE:-/tmp/en7b}          # built here (synthetic weights) when it is /tmp/en7b and absent
DEVICE=${DEVICE:-cuda}
PORT=${PORT:-8011}
RATES=${RATES:-"1 4 8 16 32 inf"}    # requests/s; "inf" = all at once, capped at MAX_CONC in flight
MAX_CONC=${MAX_CONC:-64}             # the engine's max batch (build --max-batch-size 64)
NUM_PROMPTS=${NUM_PROMPTS:-200}      # per rate, at most ...
MAX_SECONDS=${MAX_SECONDS:-40}       # ... and about this many seconds of arrivals: n = min(NUM_PROMPTS, rate*MAX_SECONDS)
MIN_PROMPTS=${MIN_PROMPTS:-8}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
SLO_TTFT_MS=${SLO_TTFT_MS:-200}
SLO_TPOT_MS=${SLO_TPOT_MS:-20}
GPU_MEM_UTIL=${GPU_MEM_UTIL:-0.9}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}   # seconds from launch to a healthy server
BUDGET_S=${BUDGET_S:-400}            # start no new rate after this many seconds of the whole script
WARMUP_PROMPTS=${WARMUP_PROMPTS:-$((2 * MAX_CONC))}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/llmc-serve-work}
# An absent ENGINE is built from synthetic weights (the same flags as benchmarks/synthetic_engines.sh) when
# SYNTHETIC=1, the default for /tmp/en7b; a /tmp/en7b found already built is taken to be that synthetic one.
SYNTH_SHAPE=${SYNTH_SHAPE:-llama-2-7b}
BUILD_MAX_SEQ_LEN=${BUILD_MAX_SEQ_LEN:-4096}
BUILD_MAX_BATCH=${BUILD_MAX_BATCH:-64}
if [ "$ENGINE" = /tmp/en7b ]; then SYNTHETIC=${SYNTHETIC:-1}; else SYNTHETIC=${SYNTHETIC:-0}; fi
if [ -z "${WEIGHTS:-}" ]; then
  if [ "$SYNTHETIC" = 1 ]; then
    WEIGHTS="synthetic: random weights in the $SYNTH_SHAPE shape (benchmarks/synthetic_ckpt.py $SYNTH_SHAPE, bf16, seed 0) and no tokenizer, so the server detokenizes nothing; latency and throughput figures only, the generated text is meaningless"
  else
    WEIGHTS="as built in $ENGINE"
  fi
fi

rm -rf "$WORK"; mkdir -p "$WORK"
LOG=$OUT/serve.log
: > "$LOG"
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
now() { date +%s.%N; }

# --- 1. the carried wheels ------------------------------------------------------------------------
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl >>"$LOG" 2>&1 || { log "FAILED: wheel install"; exit 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
# Fail in seconds, not after the engine build, if anything `serve` or `bench serve` imports is missing.
if ! python3 -c "import fastapi, uvicorn, pydantic, aiohttp, llmc.serve.app, llmc.benchmark.serving" >>"$LOG" 2>&1; then
  tail -5 "$LOG"; log "FAILED: imports (see above)"; exit 1
fi
python3 - >"$WORK/env.json" 2>>"$LOG" <<'PY'
import json, platform, sys, importlib.metadata as md
import torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for p in ("triton", "transformers", "fastapi", "starlette", "uvicorn", "pydantic", "typing_extensions", "aiohttp",
          "uvloop"):
    try:
        env[p] = md.version(p)
    except md.PackageNotFoundError:
        env[p] = None
print(json.dumps(env))
PY
log "env: $(cat "$WORK/env.json")"

# --- 2. the engine ----------------------------------------------------------------------------------
BUILD_S=null
STARTUP_S=null
if [ ! -f "$ENGINE/engine.json" ]; then
  if [ "$SYNTHETIC" != 1 ]; then log "FAILED: no engine at $ENGINE (SYNTHETIC=1 builds one)"; exit 1; fi
  log "building a synthetic $SYNTH_SHAPE bf16 engine (random weights) into $ENGINE"
  tb=$(now)
  CKPT=$ENGINE.ckpt
  rm -rf "$CKPT" "$ENGINE"
  python3 benchmarks/synthetic_ckpt.py "$SYNTH_SHAPE" "$CKPT" --device "$DEVICE" >"$WORK/build.log" 2>&1 &&
    python3 -m llmc.cli build "$CKPT" -o "$ENGINE" --device "$DEVICE" --max-seq-len "$BUILD_MAX_SEQ_LEN" \
      --max-batch-size "$BUILD_MAX_BATCH" >>"$WORK/build.log" 2>&1
  rc=$?
  rm -rf "$CKPT"
  if [ $rc -ne 0 ] || [ ! -f "$ENGINE/engine.json" ]; then
    tail -c 3000 "$WORK/build.log" | tr '\r' '\n' | tail -20 >>"$LOG"; log "FAILED: engine build"; exit 1
  fi
  BUILD_S=$(python3 -c "print(round($(now) - $tb, 1))")
  log "engine built in ${BUILD_S}s"
else
  log "reusing the engine at $ENGINE"
fi
VOCAB=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['model']['vocab_size'])" "$ENGINE/engine.json")

# --- 3. the server ------------------------------------------------------------------------------------
health() { python3 -c "import urllib.request as u,sys; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; }
if health; then log "FAILED: something already answers on port $PORT"; exit 1; fi
SERVER_PID=
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null
  for _ in $(seq 1 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$SERVER_PID" 2>/dev/null
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
}
trap stop_server EXIT
SERVE_CMD="python3 -m llmc.cli serve $ENGINE --host 127.0.0.1 --port $PORT --device $DEVICE --gpu-memory-utilization $GPU_MEM_UTIL --max-queued-requests 4096 --log-level info"
log "launching: $SERVE_CMD"
tl=$(now)
$SERVE_CMD >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
python3 - "$PORT" "$SERVER_PID" "$STARTUP_TIMEOUT" <<'PY'
import os, sys, time, urllib.request
port, pid, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
t0 = time.time()
def alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
while time.time() - t0 < limit:
    if not alive():
        sys.exit(2)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(1)
PY
rc=$?
STARTUP_S=$(python3 -c "print(round($(now) - $tl, 2))")
if [ $rc -ne 0 ]; then
  tail -c 4000 "$OUT/server.log" | tail -25 >>"$LOG"
  log "FAILED: server not healthy (rc $rc: 1 = timeout after ${STARTUP_TIMEOUT}s, 2 = exited) after ${STARTUP_S}s"
  stop_server; exit 1
fi
log "server healthy ${STARTUP_S}s after launch (engine load + CUDA graph capture + imports)"
grep -m1 "llmc.serve: serving " "$OUT/server.log" | tee -a "$LOG"

metrics() { python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$PORT/metrics', timeout=10).read().decode())" >"$1" 2>/dev/null; }
BENCH="python3 -m llmc.cli bench serve --base-url http://127.0.0.1:$PORT --input-len $INPUT_LEN --output-len $OUTPUT_LEN --vocab-size $VOCAB --ignore-eos --temperature 0 --warmup 0 --no-progress --timeout 300"

# Warm-up (not reported): every batch size up to MAX_CONC, so Triton JIT/autotuning and allocator growth
# land here rather than in the first timed requests.
log "warm-up: $WARMUP_PROMPTS requests at concurrency $MAX_CONC"
timeout 240 $BENCH -n "$WARMUP_PROMPTS" --output-len 32 --request-rate inf --max-concurrency "$MAX_CONC" --seed 1000 \
  -o "$WORK/warmup.json" >>"$LOG" 2>&1 || log "warm-up failed (rc $?), going on"
metrics "$WORK/metrics_0.txt"

# --- 4. the sweep -------------------------------------------------------------------------------------
summarize() {
export ENGINE DEVICE RATES NUM_PROMPTS MAX_SECONDS MIN_PROMPTS INPUT_LEN OUTPUT_LEN SLO_TTFT_MS SLO_TPOT_MS MAX_CONC \
  WARMUP_PROMPTS WEIGHTS BUILD_S STARTUP_S SERVE_CMD T0 WORK OUT
python3 - <<'PY'
import json, os, re, time
E = os.environ
work, out = E["WORK"], E["OUT"]
slo_ttft, slo_tpot = float(E["SLO_TTFT_MS"]), float(E["SLO_TPOT_MS"])
num = lambda k: json.loads(E[k])  # numbers, or null


def prom(path):
    vals = {}
    try:
        for line in open(path):
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)$", line.strip())
            if m:
                vals[m.group(1)] = float(m.group(2))
    except (OSError, ValueError):
        pass
    return vals


rows, runs = [], {}
for i, tag in enumerate(E["RATES"].split(), 1):
    status_path = os.path.join(work, f"status_{tag}")
    if not os.path.exists(status_path):
        continue
    status = open(status_path).read().strip()
    path = os.path.join(work, f"bench_{tag}.json")
    if not os.path.exists(path):
        rows.append({"rate": tag, "status": status})
        continue
    d = json.load(open(path))
    runs[tag] = d
    r, c = d["results"], d["config"]
    m0, m1 = prom(os.path.join(work, f"metrics_{i - 1}.txt")), prom(os.path.join(work, f"metrics_{i}.txt"))
    delta = lambda k: (m1[k] - m0[k]) if k in m0 and k in m1 else None
    p = lambda k, q: (r.get(k) or {}).get(q)
    ttft99, tpot50 = p("ttft_ms", "p99"), p("tpot_ms", "p50")
    rows.append({
        "rate": c["request_rate"], "max_concurrency": c["max_concurrency"], "status": status,
        "num_requests": c["num_requests"], "completed": r["completed"], "failed": r["failed"],
        "errors": r["errors"], "duration_s": round(r["duration_s"], 2),
        "request_throughput": r["request_throughput"], "output_tok_s": r["output_throughput"],
        "ttft_ms": {q: p("ttft_ms", q) for q in ("mean", "p50", "p90", "p99")},
        "tpot_ms": {q: p("tpot_ms", q) for q in ("mean", "p50", "p90", "p99")},
        "itl_ms": {q: p("itl_ms", q) for q in ("p50", "p99", "max")},
        "e2el_ms": {q: p("e2el_ms", q) for q in ("p50", "p99")},
        "goodput_req_s": r.get("goodput"), "slo_attainment": r.get("slo_attainment"),
        "p99_ttft_under_slo": None if ttft99 is None else ttft99 < slo_ttft,
        "median_tpot_under_slo": None if tpot50 is None else tpot50 < slo_tpot,
        "meets_slo": None if ttft99 is None or tpot50 is None else (ttft99 < slo_ttft and tpot50 < slo_tpot),
        "peak_concurrent_requests": r["max_concurrent_requests"],
        "incomplete_outputs": r["incomplete_outputs"],
        "server_preemptions": delta("llmc:num_preemptions_total"),
        "server_prefix_cache_hit_tokens": delta("llmc:prefix_cache_hits_total"),
    })
eng = json.load(open(os.path.join(E["ENGINE"], "engine.json")))
b, mo = eng["build"], eng["model"]
log_line = open(os.path.join(out, "server.log"), errors="replace").read()
log_line = log_line.split("llmc.serve: ", 1)[1].split("\n", 1)[0][:200] if "llmc.serve: " in log_line else None
summary = {
    "what": "llmc serve latency under load: llmc bench serve, streaming /v1/completions, Poisson arrivals",
    "weights": E["WEIGHTS"],
    "engine": {"path": E["ENGINE"], "dtype": b["dtype"], "max_batch_size": b["max_batch_size"],
               "max_seq_len": b["max_seq_len"], "max_num_tokens": b["max_num_tokens"],
               "block_size": b["block_size"], "layers": mo["num_hidden_layers"], "hidden": mo["hidden_size"],
               "vocab": mo["vocab_size"], "build_s": num("BUILD_S")},
    "device": E["DEVICE"], "env": json.load(open(os.path.join(work, "env.json"))),
    "server": {"command": E["SERVE_CMD"], "startup_s": num("STARTUP_S"),
               "startup_note": "launch to the first 200 from /health: imports, engine load, KV cache allocation, "
                               "CUDA graph capture",
               "log_line": log_line},
    "workload": {"input_len": int(E["INPUT_LEN"]), "output_len": int(E["OUTPUT_LEN"]),
                 "prompts": "random token ids, a distinct seed per rate (no prefix sharing between runs)",
                 "ignore_eos": True, "temperature": 0, "stream": True,
                 "requests_per_rate": f"min({E['NUM_PROMPTS']}, rate*{E['MAX_SECONDS']}s), at least "
                                      f"{E['MIN_PROMPTS']}; inf: {E['NUM_PROMPTS']} at max concurrency {E['MAX_CONC']}",
                 "warmup_requests": int(E["WARMUP_PROMPTS"])},
    "slo": {"ttft_ms": slo_ttft, "tpot_ms": slo_tpot,
            "meets_slo": "p99 TTFT < ttft_ms and median TPOT < tpot_ms; goodput: requests/s meeting both, each"},
    "rows": rows,
    "elapsed_s": round(time.time() - int(E["T0"])),
}
json.dump(summary, open(os.path.join(out, "serve_summary.json"), "w"), indent=1)
json.dump(runs, open(os.path.join(out, "serve_runs.json"), "w"), indent=1)
PY
}

i=0
for rate in $RATES; do
  i=$((i + 1))
  elapsed=$(( $(date +%s) - T0 ))
  if [ "$elapsed" -ge "$BUDGET_S" ]; then
    log "skipping rate $rate: ${elapsed}s spent, budget ${BUDGET_S}s"
    echo "skipped: time budget" >"$WORK/status_$rate"; cp "$WORK/metrics_$((i - 1)).txt" "$WORK/metrics_$i.txt" 2>/dev/null
    continue
  fi
  if [ "$rate" = inf ]; then
    n=$NUM_PROMPTS; extra="--max-concurrency $MAX_CONC"
  else
    n=$(python3 -c "print(max($MIN_PROMPTS, min($NUM_PROMPTS, int($rate * $MAX_SECONDS))))"); extra=
  fi
  log "rate $rate: $n requests $extra"
  timeout $((MAX_SECONDS + 90)) $BENCH -n "$n" --request-rate "$rate" $extra --seed "$i" \
    --slo-ttft-ms "$SLO_TTFT_MS" --slo-tpot-ms "$SLO_TPOT_MS" -o "$WORK/bench_$rate.json" >>"$LOG" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then echo ok >"$WORK/status_$rate"; else echo "failed: bench rc $rc" >"$WORK/status_$rate"; log "rate $rate: bench rc $rc"; fi
  metrics "$WORK/metrics_$i.txt"
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then log "server died"; summarize; break; fi
  summarize || log "summary failed"
done

stop_server
trap - EXIT
summarize || log "summary failed"
python3 - "$OUT/serve_summary.json" <<'PY' | tee -a "$LOG"
import json, sys
s = json.load(open(sys.argv[1]))
print(f"weights: {s['weights'][:60]}...  startup {s['server']['startup_s']} s  build {s['engine']['build_s']} s")
print(f"{'rate':>6} {'done':>5} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7} {'ITL p99':>8} {'goodput':>8}  SLO")
f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
for r in s["rows"]:
    if "completed" not in r:
        print(f"{r['rate']:>6}  {r['status']}"); continue
    print(f"{str(r['rate']):>6} {r['completed']:>5} {f(r['output_tok_s'],0):>8} {f(r['ttft_ms']['p50']):>9} {f(r['ttft_ms']['p99']):>8}"
          f" {f(r['tpot_ms']['p50'],2):>9} {f(r['tpot_ms']['p99'],2):>7} {f(r['itl_ms']['p99'],2):>8} {f(r['goodput_req_s'],2):>8}  {r['meets_slo']}")
PY
log "done in $(( $(date +%s) - T0 ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
