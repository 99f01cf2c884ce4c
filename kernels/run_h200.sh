#!/usr/bin/env bash
# The GPU acceptance runs of issues 3 and 4, as run on the lent H200 (see docs/BENCHMARKS.md).
# Usage (repository root, on the GPU machine; results go to $OUT or ./runs):
#   bash kernels/run_h200.sh tests     # the CUDA tests at real shapes, alone (up to 9 minutes)
#   bash kernels/run_h200.sh kernels   # CUDA tests at real shapes + every kernel vs its PyTorch/cuBLAS baseline
#   bash kernels/run_h200.sh engine    # random:llama-2-7b vs its 30% checkpoint, kernels off/on, HF generate
#   bash kernels/run_h200.sh profile   # per-kernel breakdown of a decode step, batch 1 and 64, both models
#   bash kernels/run_h200.sh iterate   # decode-step kernel bench + engine (kernels on) + step profiles
#   bash kernels/run_h200.sh final     # the recorded 2026-11-29 run: engine kernels off/on, profiles, tests
#   bash kernels/run_h200.sh compress13b  # 13B compression wall time and peak memory
#   bash kernels/run_h200.sh final3    # session 4: changed-area CUDA tests, low-rank decode bench, engine, profiles
#   bash kernels/run_h200.sh pdl       # session 5: PDL tests, low-rank decode with/without PDL, engine
#   bash kernels/run_h200.sh pdl-ab    # session 5: PDL on/off x original/compressed, rotating rounds, + profiles
#   bash kernels/run_h200.sh final5    # session 5: changed-area CUDA tests, original vs 30 % A/B, profiles
#   bash kernels/run_h200.sh attn-sweep  # decode attention launch configs at batch 16-256, then its CUDA tests
#   bash kernels/run_h200.sh s7a       # session 7: the attention sweep, its best config end to end at 64/256, tests
#   bash kernels/run_h200.sh s7b       # session 7: graphs per context class A/B at max_model_len 4096, CUDA tests
#   bash kernels/run_h200.sh s9a       # session 9: the shipped attention default end to end vs padded tiles, b256 profiles
#   bash kernels/run_h200.sh s10a      # session 10: skinny matmuls prefetching weights into the L2 before their PDL wait, A/B
#   bash kernels/run_h200.sh s10b      # session 10: the low-rank skinny pair with the L2 prefetch vs 2 x cuBLAS, tests
#   bash kernels/run_h200.sh s10c      # session 10: the low-rank pair with a K-split shrink vs 2 x cuBLAS, its tests
#   bash kernels/run_h200.sh s12a      # session 12: picks timed as a step runs them, q/k/v + RoPE epilogue: A/B b1/16
#   bash kernels/run_h200.sh s12b      # session 12: one-token partial sums reduced after the K loop, K-split: A/B, tests
#   bash kernels/run_h200.sh s12c      # session 12: original vs 30 % at 256/64/16/1, each with and without the folded norm
#   bash kernels/run_h200.sh s12e      # session 12: kernel tests of the changed paths at real shapes
#   bash kernels/run_h200.sh s13e      # session 13: attention launch configs for the 30 % checkpoint, b16/b1
#   bash kernels/run_h200.sh s13d      # session 13: 13B original against its 30 % checkpoint, batch 256/64/16/1
#   bash kernels/run_h200.sh s13c      # session 13: multi-head attention on the CUDA cores, A/B b16/1/64 (slower; needs c0f9b63)
#   bash kernels/run_h200.sh s13b      # session 13: attention loads prefetched, RoPE in attention: A/B b16/1/64 (slower; needs 7bb3d54)
#   bash kernels/run_h200.sh s13a      # session 13: attention partitions per sequence / more per SM, A/B b1/16/64 (slower; needs 1e5f4e3)
#   bash kernels/run_h200.sh s12d      # prepared: b16/b64 timelines, the 13B A/B
#   bash kernels/run_h200.sh s11d      # session 11: configs timed behind a small kernel, the recorded A/B
#   bash kernels/run_h200.sh s11c      # session 11: configs timed back to back on weight copies, SwiGLU epilogue A/B
#   bash kernels/run_h200.sh s11b      # session 11: configs tuned in graphs, strided q: A/B, timelines, CUDA tests
#   bash kernels/run_h200.sh s11a      # session 11: cold-cache A/B, then critical-path shares of engine steps (b1, b16)
#   bash kernels/run_h200.sh s10d      # session 10: random:llama-2-13b vs its 30 % checkpoint, batch 256/64/16/1
#   bash kernels/run_h200.sh s10e      # session 10: the skinny kernel up to 64 tokens against cuBLAS at batch 64
#   bash kernels/run_h200.sh s10f      # session 10: the recorded original-vs-30 % A/B with the session's defaults
#   bash kernels/run_h200.sh s9c       # session 9: async scheduling A/B, attention sweep of KV_PACK at ragged contexts, tests
#   bash kernels/run_h200.sh s9d       # session 9: the recorded A/B with KV heads packed per attention program, tests
#   bash kernels/run_h200.sh s9e       # session 9: MLP widths aligned to 128 (head dims to 16) with the new defaults
#   bash kernels/run_h200.sh s9f       # session 9: the engine's CUDA tests after async scheduling (whole file)
#   bash kernels/run_h200.sh s9b       # prepared in session 8: attention sweep of several KV heads per program, tests
#   bash kernels/run_h200.sh s8e       # session 8: the recorded A/B, original vs 30 %, batch 256/64/16/1
#   bash kernels/run_h200.sh s8d       # session 8: head dims in chunks of >= 32: sweep, A/B batch 1-256, tests
#   bash kernels/run_h200.sh s8c       # session 8: head dims in two chunks: attention sweep, A/B batch 1-256, tests
#   bash kernels/run_h200.sh s8a       # session 8: the CUDA tests session 7 could not finish + fused projection/RoPE bench
#   bash kernels/run_h200.sh s8b       # next: the recorded A/B (context classes, batch 1-256; fused projection/RoPE)
#   bash kernels/run_h200.sh s6c       # session 6, recorded: CUDA tests, original vs 30 % at 1/16/64/256, combine fold A/B
#   bash kernels/run_h200.sh s6b       # session 6: RoPE + attention (+ combine) in one launch: CUDA tests, A/B
#   bash kernels/run_h200.sh s6a       # session 6: folded-norm A/B, CUDA tests of unverified code, Triton cache back
#   bash kernels/run_h200.sh next6     # prepared for session 6: unverified CUDA tests + folded-norm A/B
#   bash kernels/run_h200.sh pdl2      # session 5: step profiles with PDL on/off, batch 1 and 64
#   bash kernels/run_h200.sh all       # engine, kernel bench, tests: each under its own timeout
set -uo pipefail
OUT=${OUT:-runs}
mkdir -p "$OUT"
# The lent device returns at most 8 files per call (2026-11-29: a run's kernel JSON and profiles were
# lost behind the shard logs). On exit, everything goes into results.tgz and only it and the few
# summary logs stay in $OUT.
pack() {
  # tar exits 1 when a file changes while it reads it (a process still writing after a timeout): the
  # archive is still good, so pack on regardless (2026-11-29, session 5: that lost a run's JSON)
  (cd "$OUT" && { tar czf /tmp/results.tgz --exclude='./triton-cache.t?z.*' . || true; } && mv /tmp/results.tgz results.tgz \
      && find . -type f ! -name results.tgz ! -name run.log ! -name 'triton-cache.tgz.*' \
      ! -name 'triton-cache.txz.*' ! -name cuda-tests.log ! -name bench-engine-h200.log -delete) || true
}
[ "${PACK:-1}" = 1 ] && trap pack EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# Triton's cache (compiled kernels and autotuning results, keyed by Triton version, GPU target and kernel
# source) travels between calls: every call gets a fresh machine, and a cold cache cost minutes of
# compiling and tuning (session 5). A call that carries `.tcache` (ignored by git: .git/info/exclude)
# starts from it; `tcache_out` returns the cache as <= 15 MiB parts (the device returns 16 MiB a file),
# to be copied back into .tcache here.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
# A carried cache may also be xz parts (triton-cache.txz.*: the same files in under half the bytes of gzip,
# decompressed by Python's lzma, which every image has; session 10). Parts of several calls are several
# concatenated xz streams of tar archives: lzma reads them all, tar -i reads past each end-of-archive.
if ls .tcache/triton-cache.txz.* > /dev/null 2>&1; then
  cat .tcache/triton-cache.txz.* | $PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" \
      | tar xif - -C "$TRITON_CACHE_DIR" && echo "triton cache: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files carried in"
elif ls .tcache/triton-cache.tgz.* > /dev/null 2>&1; then
  cat .tcache/triton-cache.tgz.* | tar xzf - -C "$TRITON_CACHE_DIR" && echo "triton cache: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files carried in"
fi
touch /tmp/tcache-start
tcache_out() {  # only what this call added (the carried part is already here), as xz parts of <= 15 MiB:
  # the compiled binaries (.cubin), the metadata, tuning results and picks (.json), not the intermediate
  # IR (.ttir/.ttgir/.llir/.ptx/.source: Triton loads a cached kernel from its group's files that exist,
  # triton/compiler/compiler.py CompiledKernel, and needs only the binary), which is most of the bytes
  (cd "$TRITON_CACHE_DIR" && find . -mindepth 1 -maxdepth 1 -type d -newer /tmp/tcache-start -print0 \
      | xargs -0 -r -I{} find {} -type f ! -name '*.ttir' ! -name '*.ttgir' ! -name '*.llir' ! -name '*.ptx' \
          ! -name '*.source' -print0 \
      | tar cf - --null -T - | $PY -c "import lzma, shutil, sys; shutil.copyfileobj(sys.stdin.buffer, lzma.open(sys.stdout.buffer, 'w', preset=6))") \
      | split -b 15M -d - "$OUT/triton-cache.txz."
  ls -la "$OUT"/triton-cache.txz.* | tee -a "$OUT/run.log"
}

tests() {  # [timeout] [shards] [pytest selection...]: the CUDA suite in parallel shards (Triton compiles
  # are CPU-bound and the GPU machine has 16 cores); each test bounded (a hang costs 60 s), and every
  # outcome streams to $OUT/cuda-tests-progress.log, so a run cut by the time limit still says what failed
  local limit=${1:-150} shards=${2:-4}; shift 2 2>/dev/null || shift $#
  local sel=("$@"); [ ${#sel[@]} -gt 0 ] || sel=(tests/test_engine_cuda.py tests/test_kernels.py)
  for i in $(seq 0 $((shards - 1))); do
    MODEGPT_TEST_SHARD=$i/$shards MODEGPT_TEST_PROGRESS="$OUT/cuda-tests-progress.log" timeout "$limit" \
        $PY -m pytest -q -p no:cacheprovider --timeout ${TEST_TIMEOUT:-60} -o log_cli=false -rfE --durations=10 "${sel[@]}" \
        > "$OUT/cuda-tests-shard$i.log" 2>&1 &
  done
  wait
  tail -n 3 "$OUT"/cuda-tests-shard*.log | tee "$OUT/cuda-tests.log"
  local p="$OUT/cuda-tests-progress.log"; touch "$p"
  echo "progress: $(grep -c '^PASSED' "$p") passed, $(grep -cE '^(FAILED|ERROR)' "$p") failed," \
       "$(grep -c '^SKIPPED' "$p") skipped" | tee -a "$OUT/cuda-tests.log"
}
kernel_bench() {  # [timeout] [budget] [only: python tuple of case-name prefixes]
  timeout "${1:-200}" $PY -c "from kernels.bench import run_kernel_bench
run_kernel_bench('$OUT/kernels-h200.json', time_budget_s=${2:-150}, only=${3:-()}, sweep=not ${3:-()})" \
      2>&1 | tee "$OUT/kernels-h200.log"
}
attn_sweep() {  # [timeout] [budget]: kernels.bench.run_attention_sweep (its configs and cases) -> attention-sweep-h200.json
  timeout "${1:-300}" $PY -c "from kernels.bench import run_attention_sweep
run_attention_sweep('$OUT/attention-sweep-h200.json', time_budget_s=${2:-240})" 2>&1 | tee "$OUT/kernels-h200.log"
}
ab_dim_chunks() {  # timeout batches...: original, 30 % (auto: chunked head dims) and 30 % with padded 32-key
  # tiles, in one process at a server's max_model_len
  local limit=$1; shift
  timeout "$limit" $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 /tmp/l7b-30@MODEGPT_ATTN_CONFIG=32/4w/2s \
      --device cuda --dtype bfloat16 --batch "$@" --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 \
      --json "$OUT/bench-ab-dim-chunks.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
}
# config.json of a real 30% compression of random:llama-2-7b, re-rounded to the compressor's default for
# this size since session 9 (widths to 128, head dims to 16); sessions 2-9 ran llama-2-7b-30.config.json
# (widths to 8), the compression itself: SHAPES=kernels/shapes/llama-2-7b-30.config.json repeats them as run
SHAPES=${SHAPES:-kernels/shapes/llama-2-7b-30-a128.config.json}
ckpt() {  # ${CKPT:-/tmp/l7b-30}: compress for real (~100 s), or, once its config is in the repo, a random-weight twin
  local dir=${CKPT:-/tmp/l7b-30}
  [ -d "$dir" ] && return 0
  if [ -f "$SHAPES" ]; then  # same shapes, random weights: identical timing (the source weights are random too)
    $PY -c "import json, torch; from compressor.checkpoint import write_checkpoint; from server.engine.testing import random_state_dict
cfg = json.load(open('$SHAPES')); sd = {k: v.cpu() for k, v in random_state_dict(cfg, device='cuda', dtype=torch.bfloat16).items()}
write_checkpoint('$dir', cfg, sd, None, {'note': 'random weights with the shapes of $SHAPES'}, overwrite=True)"
  else
    $PY -c "from compressor.pipeline import CompressOptions, compress
compress('random:llama-2-7b', '/tmp/l7b-30', CompressOptions(ratio=0.3, device='cuda', progress=False), overwrite=True)"
    cp /tmp/l7b-30/config.json "$OUT/llama-2-7b-30.config.json"
  fi
}
ckpt_aligned() {  # /tmp/l7b-30-a$1: the same allocation re-rounded (MLP widths to $1, head dims to $2)
  [ -d /tmp/l7b-30-a$1 ] && return 0
  $PY -c "import json, torch; from compressor.checkpoint import write_checkpoint
from server.engine.testing import random_state_dict, realigned_config
cfg = realigned_config(json.load(open('$SHAPES')), 11008, $1, $2)
sd = {k: v.cpu() for k, v in random_state_dict(cfg, device='cuda', dtype=torch.bfloat16).items()}
write_checkpoint('/tmp/l7b-30-a$1', cfg, sd, None, {'note': 'random weights, $SHAPES re-rounded to align $1/$2'}, overwrite=True)"
}
engine() {  # the bench via its Python entry points: the GPU image has no pydantic/fastapi for the full CLI
  ckpt
  timeout "${1:-330}" $PY - "$OUT" "${2:-both}" "${3:-hf}" "${@:4}" <<'PYEOF' 2>&1 | tee "$OUT/bench-engine-h200.log"
import argparse, sys
from server.bench_engine import add_engine_bench
p = argparse.ArgumentParser(); add_engine_bench(p.add_subparsers())
extra = ["--hf-generate"] if sys.argv[3] == "hf" else []
a = p.parse_args(["engine", "random:llama-2-7b", *(sys.argv[4:] or ["/tmp/l7b-30"]), "--device", "cuda", "--batch", "1", "16", "64", "256",
                  "--kernels", sys.argv[2], "--kv-cache-gb", "40", "--json", sys.argv[1] + "/bench-engine-h200.json"] + extra)
a.func(a)
PYEOF
}
profile1() {  # model batch tag [env...]: one step profile with per-kernel trace
  local m=$1 b=$2 tag=$3; shift 3
  env "$@" timeout ${PROFILE_TIMEOUT:-150} $PY -m server.engine.profile_step "$m" --device cuda --batch $b --trace --steps 30 \
      --kv-cache-gb ${PROFILE_KV_GB:-4} \
      --json "$OUT/profile-$tag-b$b.json" > "$OUT/profile-$tag-b$b.log" 2>&1 || echo "profile $tag b=$b failed"
}
timeline1() {  # model batch tag: critical-path shares of whole engine steps (Chrome trace kept in results.tgz)
  local m=$1 b=$2 tag=$3
  timeout ${PROFILE_TIMEOUT:-150} $PY -m server.engine.profile_step "$m" --device cuda --batch $b --steps 30 \
      --kv-cache-gb ${PROFILE_KV_GB:-4} --timeline "$OUT/trace-$tag-b$b.json" \
      --json "$OUT/timeline-$tag-b$b.json" > "$OUT/timeline-$tag-b$b.log" 2>&1 || echo "timeline $tag b=$b failed"
}
profile() {  # where a decode step goes: per-kernel device time inside the graph, host, sampler (batch 1 and 64)
  ckpt
  for b in ${PROFILE_BATCHES:-1 64}; do profile1 random:llama-2-7b $b original; profile1 /tmp/l7b-30 $b compressed; done
}

case "${1:-}" in
tests) tests 540 4 ;;  # the whole CUDA suite at real shapes (autotuning off: tests/conftest.py), its own call
kernels) tests 300; kernel_bench ;;
engine) engine ;;
profile) profile ;;
engine-on+profile) engine 300 on; profile ;;
iterate)  # the decode-step kernels vs their baselines, then the engine and step profiles with them
  ckpt; kernel_bench 150 120 '("skinny", "rope_qkv", "attention_short")'
  engine 260 on; PROFILE_BATCHES=1 profile
  profile1 /tmp/l7b-30 1 compressed-cublas MODEGPT_SKINNY_MAX_TOKENS=0 ;;
final)  # the recorded run: skinny check on the ragged-K shapes, engine kernels off/on, profiles, CUDA tests
  ckpt; kernel_bench 60 40 '("skinny 7b-30% 9880", "skinny 7b-30% 7288", "skinny 7b-30% 6936", "skinny 7b 11008", "skinny 7b-30% 4096->10752")'
  engine 260 both nohf; PROFILE_BATCHES=1 profile
  timeout 150 $PY -m pytest -q -p no:cacheprovider --timeout 60 -rfE --durations=8 tests/test_kernels.py \
      -k "skinny or rope or attention or norm or silu or cuda_graph or bf16 or async_engines or bridge" \
      tests/test_engine_cuda.py 2>&1 | tee "$OUT/cuda-tests.log" ;;
final2)  # after the graph-timed per-shape pick: engine (kernels on) and step profiles
  ckpt; engine 170 on nohf; PROFILE_BATCHES=1 PROFILE_TIMEOUT=60 profile ;;
iterate2)  # the skinny linear vs cuBLAS, the engine with it, profiles, then the CUDA tests of the new kernels
  ckpt; kernel_bench 120 90 '("skinny",)'
  engine 240 on; PROFILE_BATCHES=1 profile
  timeout 130 $PY -m pytest -q -p no:cacheprovider --timeout 60 -rfE tests/test_engine_cuda.py \
      tests/test_kernels.py -k "skinny or rope or attention or norm or silu or cuda_graph or bridge" 2>&1 | tee "$OUT/cuda-tests.log" ;;
align)  # the CUDA suite in shards, then: does rounding MLP widths to 128 (head dims to 16) speed up decode?
  ckpt; ckpt_aligned 128 16; tests 240 4
  engine 300 on nohf /tmp/l7b-30 /tmp/l7b-30-a128 ;;
final3)  # session 4: the CUDA tests of what changed, the low-rank decode kernels, the engine, a profile
  ckpt
  tests 150 4 tests/test_engine_cuda.py tests/test_kernels.py -k "lowrank or swiglu or skinny or autotune or async or bridge or graph or bf16"
  LR=""; for m in llama2-7b llama2-13b; do for d in up down; do for f in 0.25 0.5 0.75; do LR="$LR\"lowrank $m $d r=$f M=1\", "; done; done; done
  kernel_bench 140 110 "($LR)"
  engine 200 on nohf
  PROFILE_TIMEOUT=60 profile1 /tmp/l7b-30 1 compressed; PROFILE_TIMEOUT=60 profile1 random:llama-2-7b 1 original ;;
pdl)  # session 5: programmatic dependent launch. CUDA tests of the changed kernels, low-rank decode
  # (skinny pair with/without PDL, the auto pick, vs two cuBLAS), the engine with PDL on
  ckpt
  tests 120 4 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "pdl or skinny or swiglu or norm or silu or rope or attention or graph or dispatch or bf16 or async"
  LR=""; for M in 1 16; do for m in llama2-7b llama2-13b; do for d in up down; do for f in 0.25 0.5 0.75; do
    LR="$LR\"lowrank $m $d r=$f M=$M\", "; done; done; done; done
  kernel_bench 130 100 "($LR)"
  engine 200 on nohf ;;
pdl2)  # session 5: step profiles with PDL on and off, batch 1 and 64
  ckpt
  for b in ${PROFILE_BATCHES:-1 64}; do
    PROFILE_TIMEOUT=70 profile1 random:llama-2-7b $b original; PROFILE_TIMEOUT=70 profile1 /tmp/l7b-30 $b compressed
    PROFILE_TIMEOUT=70 profile1 random:llama-2-7b $b original-nopdl MODEGPT_PDL=0
    PROFILE_TIMEOUT=70 profile1 /tmp/l7b-30 $b compressed-nopdl MODEGPT_PDL=0
  done ;;
pdl-ab)  # session 5: PDL on/off and original/compressed in one process (rotating rounds), then step profiles
  timeout 240 $PY -m pytest -q -p no:cacheprovider --timeout 230 -rfE tests/test_engine_cuda.py \
      -k "cuda_graph_decode_equals_eager" > "$OUT/cuda-tests.log" 2>&1 &
  ckpt; wait
  timeout 300 $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_PDL=0 /tmp/l7b-30 \
      /tmp/l7b-30@MODEGPT_PDL=0 --device cuda --dtype bfloat16 --batch 1 16 64 --steps 64 --rounds 4 \
      --kv-cache-gb 6 --json "$OUT/bench-ab-pdl.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  PROFILE_TIMEOUT=60 profile1 /tmp/l7b-30 1 compressed; PROFILE_TIMEOUT=60 profile1 random:llama-2-7b 1 original ;;
final5)  # session 5, the recorded run: CUDA tests of what changed (PDL, SwiGLU epilogue), then the 30 %
  # checkpoint against the original in one process (rotating rounds, kernels and PDL on), step profiles
  ckpt
  TEST_TIMEOUT=120 tests 170 4 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "pdl or skinny or swiglu or norm or silu or graph or dispatch or bf16 or async or engine"
  timeout 240 $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 --device cuda --dtype bfloat16 \
      --batch 1 16 64 256 --steps 64 --rounds 4 --kv-cache-gb 20 --json "$OUT/bench-ab-final.json" 2>&1 \
      | tee "$OUT/bench-engine-h200.log"
  PROFILE_TIMEOUT=60 profile1 /tmp/l7b-30 1 compressed; PROFILE_TIMEOUT=60 profile1 random:llama-2-7b 1 original ;;
ab1)  # session 5, last call: the original against the 30 % checkpoint at batch 1, rotating rounds
  ckpt
  timeout ${AB_TIMEOUT:-200} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 --device cuda \
      --dtype bfloat16 --batch ${AB_BATCHES:-1} --steps 64 --rounds 5 --kv-cache-gb 4 \
      --json "$OUT/bench-ab-b1.json" 2>&1 | tee "$OUT/bench-engine-h200.log" ;;
next6)  # prepared for session 6 (not run yet): the CUDA tests of session 5's unverified code (folded norm,
  # SwiGLU epilogue, pick warm-up), then the A/B with the folded norm on and off. A cold Triton cache
  # costs minutes of autotuning before the first A/B line (session 5, calls 3-4): the A/B gets 330 s.
  ckpt
  TEST_TIMEOUT=150 tests 200 4 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "pdl or norm_skinny or swiglu_mlp or swiglu_epilogue or bridge or cuda_graph or engine"
  timeout 330 $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_FUSED_NORM=1 /tmp/l7b-30 \
      /tmp/l7b-30@MODEGPT_FUSED_NORM=1 --device cuda --dtype bfloat16 --batch 1 16 --steps 64 --rounds 4 \
      --kv-cache-gb 4 --json "$OUT/bench-ab-fused-norm.json" 2>&1 | tee "$OUT/bench-engine-h200.log" ;;
s6a)  # session 6, first call: the 7B original and 30 % checkpoint, each with the folded add + RMSNorm
  # (MODEGPT_FUSED_NORM=1) and without, in one process (rotating rounds); then the CUDA tests of the code
  # session 5 left unverified and of the parallel precompile; then the Triton cache goes back
  ckpt
  timeout ${AB_TIMEOUT:-300} $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_FUSED_NORM=1 \
      /tmp/l7b-30 /tmp/l7b-30@MODEGPT_FUSED_NORM=1 --device cuda --dtype bfloat16 --batch 1 16 64 --steps 64 \
      --rounds 4 --kv-cache-gb 4 --json "$OUT/bench-ab-fused-norm.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  TEST_TIMEOUT=150 tests ${TESTS_TIMEOUT:-170} 4 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "pdl or norm_skinny or swiglu_mlp or swiglu_epilogue or bridge or cuda_graph or engine or precompile"
  tcache_out ;;
s6b)  # session 6, second call: RoPE + cache write + attention (+ the split combine) in one launch. CUDA
  # tests of it and of what failed in s6a, then original and 30 % with the new attention, with the old
  # two/three-launch path (MODEGPT_ROPE_ATTENTION=0) and with the combine as its own launch
  ckpt
  TEST_TIMEOUT=120 tests ${TESTS_TIMEOUT:-150} 4 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "attention or rope or precompile or bridge or cuda_graph or engine or pdl"
  timeout ${AB_TIMEOUT:-300} $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_ROPE_ATTENTION=0 \
      /tmp/l7b-30 /tmp/l7b-30@MODEGPT_ROPE_ATTENTION=0 /tmp/l7b-30@MODEGPT_ATTN_COMBINE_FOLD=0 --device cuda \
      --dtype bfloat16 --batch 1 16 64 --steps 64 --rounds 4 --kv-cache-gb 4 --json "$OUT/bench-ab-rope-attn.json" \
      2>&1 | tee "$OUT/bench-engine-h200.log"
  tcache_out ;;
s6c)  # session 6, third call (the recorded one): CUDA tests of the fixes (pick capture, float32 low-rank
  # tiles, the attention variants), then the original against the 30 % checkpoint in the default
  # configuration (RoPE launch, attention with its split combine folded in) and with the combine as its
  # own launch, at batch 1, 16, 64 and 256 in one process
  ckpt
  TEST_TIMEOUT=120 tests ${TESTS_TIMEOUT:-150} 4 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "attention or rope or precompile or bridge or cuda_graph or engine or pdl"
  timeout ${AB_TIMEOUT:-330} $PY -m server.engine.bench_ab random:llama-2-7b \
      random:llama-2-7b@MODEGPT_ATTN_COMBINE_FOLD=0 /tmp/l7b-30 /tmp/l7b-30@MODEGPT_ATTN_COMBINE_FOLD=0 \
      --device cuda --dtype bfloat16 --batch 1 16 64 256 --steps 48 --rounds 4 --kv-cache-gb 18 \
      --json "$OUT/bench-ab-final6.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  tcache_out ;;
s6d)  # session 6, last call: where a batch-256 decode step goes, original and 30 % (per-kernel trace)
  ckpt
  PROFILE_KV_GB=28 PROFILE_TIMEOUT=120 profile1 random:llama-2-7b 256 original
  PROFILE_KV_GB=28 PROFILE_TIMEOUT=120 profile1 /tmp/l7b-30 256 compressed ;;
attn-sweep)  # prepared in session 6 for the next: decode attention launch configs at batch 16-256 (the
  # batch-256 step spends half its graph in attention, at ~2.5 TB/s), then its CUDA tests
  attn_sweep ${SWEEP_TIMEOUT:-300} ${SWEEP_BUDGET:-240}
  TEST_TIMEOUT=120 tests 150 4 tests/test_kernels.py -k "attention" ;;
s7a)  # session 7, first call: the decode attention sweep (tensor-core and CUDA-core paths, 36 launch
  # configurations, batch 256 first), then the original and the 30 % checkpoint with the sweep's best
  # configuration at batch 64 and 256 (MODEGPT_ATTN_CONFIG) against the default, then the CUDA tests of
  # the attention kernels
  ckpt &
  attn_sweep ${SWEEP_TIMEOUT:-230} ${SWEEP_BUDGET:-170}
  wait
  BEST=$($PY -c "import json, math
d = json.load(open('$OUT/attention-sweep-h200.json'))
cases = [c for c in d['cases'] if 'timings' in c and c['batch'] >= 64 and c['context'] == 128]
names = set.intersection(*[{k for k, v in c['timings'].items() if 'us' in v} for c in cases])
score = {n: sum(math.log(c['timings'][n]['us']) for c in cases) for n in names}
print(min(score, key=score.get))" 2>> "$OUT/run.log")
  echo "best attention config at batch >= 64, context 128: ${BEST:-none}" | tee -a "$OUT/run.log"
  if [ -n "$BEST" ]; then
    timeout ${AB_TIMEOUT:-230} $PY -m server.engine.bench_ab random:llama-2-7b "random:llama-2-7b@MODEGPT_ATTN_CONFIG=$BEST" \
        /tmp/l7b-30 "/tmp/l7b-30@MODEGPT_ATTN_CONFIG=$BEST" --device cuda --dtype bfloat16 --batch 64 256 --steps 48 \
        --rounds 3 --kv-cache-gb 18 --json "$OUT/bench-ab-attn-config.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  fi
  TEST_TIMEOUT=60 tests ${TESTS_TIMEOUT:-80} 4 tests/test_kernels.py -k "attention"
  tcache_out ;;
s7b)  # session 7, second (last) call, 6.7 device minutes left: at a server's max_model_len (4096), the
  # original and the 30 % checkpoint with decode graphs per context class (the default) against one
  # 4096-wide class, in one process; then the CUDA tests of the context classes and attention configs
  ckpt
  timeout ${AB_TIMEOUT:-210} $PY -m server.engine.bench_ab random:llama-2-7b@MODEGPT_GRAPH_CONTEXTS=0 random:llama-2-7b \
      /tmp/l7b-30@MODEGPT_GRAPH_CONTEXTS=0 /tmp/l7b-30 --device cuda --dtype bfloat16 --batch 1 256 64 16 --steps 32 \
      --rounds 3 --kv-cache-gb 16 --max-model-len 4096 --json "$OUT/bench-ab-context-classes.json" 2>&1 \
      | tee "$OUT/bench-engine-h200.log"
  TEST_TIMEOUT=100 tests ${TESTS_TIMEOUT:-105} 2 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "context_classes or auto_config or launch_configs" ;;
s8a)  # prepared in session 7 for the next: the CUDA tests session 7 could not finish (decode graphs per
  # context class, the fused projection + RoPE at real shapes, attention configs, the engine with every
  # kernel option), then the fused projection + RoPE against projection + RoPE launch (kernels.bench)
  ckpt
  TEST_TIMEOUT=200 tests ${TESTS_TIMEOUT:-300} 4 tests/test_engine_cuda.py tests/test_kernels.py tests/test_skinny_rope.py \
      -k "context_classes or graph or rope or attention or engine or skinny"
  kernel_bench 180 150 '("linear_rope",)'
  tcache_out ;;
s8c)  # session 8, call 2: head dims read in two power-of-two chunks (DIM_CHUNKS, "/cd"): the attention
  # sweep (chunks against one padded power of two), then the recorded A/B at a server's max_model_len: the
  # original, the 30 % checkpoint (auto: chunks) and the 30 % checkpoint with pow2-padded dims, batch 1-256;
  # then the CUDA tests of the attention kernels
  ckpt &
  attn_sweep ${SWEEP_TIMEOUT:-150} ${SWEEP_BUDGET:-110}
  wait
  ab_dim_chunks ${AB_TIMEOUT:-300} 1 256 64 16
  TEST_TIMEOUT=60 tests ${TESTS_TIMEOUT:-90} 4 tests/test_kernels.py -k "attention" ;;
s8d)  # session 8, call 3: s8c again after its finding (80 as 64 + 16 was slower; now 64 + 32): the sweep of
  # the 30 % checkpoint's head dims, the recorded A/B at max_model_len 4096, then the CUDA tests of the
  # attention kernels and of the engine's graphs with them
  ckpt &
  attn_sweep ${SWEEP_TIMEOUT:-120} ${SWEEP_BUDGET:-90}
  wait
  ab_dim_chunks ${AB_TIMEOUT:-280} 1 256 64 16
  TEST_TIMEOUT=100 tests ${TESTS_TIMEOUT:-150} 4 tests/test_kernels.py tests/test_engine_cuda.py \
      -k "attention or engine_kernels or equals_eager" ;;
s10a)  # session 10, call 1: skinny matmuls that prefetch the head of their weight rows into the L2 while
  # the previous kernel runs (MODEGPT_L2_PREFETCH=16 MiB per launch) against none, original and 30 %,
  # batch 1 and 16 (the sizes the skinny kernel serves; 64-256 run cuBLAS and are unaffected)
  ckpt
  timeout ${AB_TIMEOUT:-420} $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_L2_PREFETCH=${PF:-16} \
      /tmp/l7b-30 /tmp/l7b-30@MODEGPT_L2_PREFETCH=${PF:-16} --device cuda --dtype bfloat16 --batch 1 16 \
      --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 --json "$OUT/bench-ab-l2-prefetch.json" 2>&1 \
      | tee "$OUT/bench-engine-h200.log"
  tcache_out ;;
s10b)  # session 10, call 2: the low-rank skinny pair with the L2 prefetch (16 and 64 MiB per launch) against two
  # cuBLAS calls at 1 and 16 tokens, then the CUDA tests of the prefetch (PDL chain in a graph, same bits)
  kernel_bench ${BENCH_TIMEOUT:-260} ${BENCH_BUDGET:-230} \
      '("lowrank llama2-7b up r=0.25 M=1", "lowrank llama2-7b down r=0.25 M=1", "lowrank llama2-13b up r=0.25 M=1", "lowrank llama2-13b down r=0.25 M=1", "lowrank llama2-7b up r=0.5 M=1", "lowrank llama2-7b up r=0.75 M=1")'
  TEST_TIMEOUT=100 tests ${TESTS_TIMEOUT:-120} 4 tests/test_kernels.py -k "pdl or l2_prefetch or skinny"
  tcache_out ;;
s10c)  # session 10, call 3: the low-rank pair with the shrink split over K (lowrank.shrink_split_triton) + the
  # skinny expand, against two cuBLAS calls, the skinny pair and what dispatch picks, at rank 25 % (1 and 16
  # tokens, 7B/13B up/down) and 50 %; then the CUDA tests of the split shrink and of the pair in a graph
  kernel_bench ${BENCH_TIMEOUT:-330} ${BENCH_BUDGET:-300} \
      '("lowrank llama2-7b up r=0.25 M=1", "lowrank llama2-7b down r=0.25 M=1", "lowrank llama2-13b up r=0.25 M=1", "lowrank llama2-13b down r=0.25 M=1", "lowrank llama2-7b up r=0.5 M=1", "lowrank llama2-7b down r=0.5 M=1")'
  TEST_TIMEOUT=100 tests ${TESTS_TIMEOUT:-150} 4 tests/test_kernels.py -k "shrink_split or split_pair or lowrank_decode or pdl"
  tcache_out ;;
s12a)  # session 12, call 1: the engine's per-shape picks timed as a step runs them (MODEGPT_PICK_TIMING=stream,
  # the new default) against the flush-based timing of sessions 5-11, and the q/k/v projection with RoPE and
  # the cache write as its epilogue (MODEGPT_QKV_ROPE=1, last measured in session 7), batch 1 and 16, one process
  ckpt
  timeout ${AB_TIMEOUT:-420} $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_PICK_TIMING=flush \
      random:llama-2-7b@MODEGPT_QKV_ROPE=1 /tmp/l7b-30 /tmp/l7b-30@MODEGPT_PICK_TIMING=flush /tmp/l7b-30@MODEGPT_QKV_ROPE=1 \
      --device cuda --dtype bfloat16 --batch 1 16 --steps 48 --rounds 3 --kv-cache-gb 4 --max-model-len 4096 \
      --json "$OUT/bench-ab-picks.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  tcache_out ;;
s12b)  # session 12, call 2: the one-token skinny path reducing its partial products once after the K loop
  # (MODEGPT_SKINNY_VEC_ACC, the new default) against a reduction in every iteration, and the K-split candidate
  # for 2-64 tokens (MODEGPT_SKINNY_SPLIT_K=auto), batch 1 and 16, one process; then the engine's CUDA tests
  ckpt
  timeout ${AB_TIMEOUT:-330} $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_SKINNY_VEC_ACC=0 \
      random:llama-2-7b@MODEGPT_SKINNY_SPLIT_K=auto /tmp/l7b-30 /tmp/l7b-30@MODEGPT_SKINNY_VEC_ACC=0 \
      /tmp/l7b-30@MODEGPT_SKINNY_SPLIT_K=auto --device cuda --dtype bfloat16 --batch 1 16 --steps 48 --rounds 3 \
      --kv-cache-gb 4 --max-model-len 4096 --json "$OUT/bench-ab-vec-acc.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  tcache_out
  TEST_TIMEOUT=200 tests ${TESTS_TIMEOUT:-200} 4 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "not test_kernels or split_over_k or counter_blocks or every_m1_tile or timed_pick or weight_copies" ;;
s12c)  # session 12, call 3: the A/B of the original against the 30 % checkpoint with this session's defaults, each
  # also with residual add + RMSNorm folded into the next matmul (MODEGPT_FUSED_NORM=1: its squares now summed
  # once after the K loop, its tiles timed by tune_config), batch 256/64/16/1, one process
  ckpt
  timeout ${AB_TIMEOUT:-450} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      random:llama-2-7b@MODEGPT_FUSED_NORM=1 /tmp/l7b-30@MODEGPT_FUSED_NORM=1 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 \
      --json "$OUT/bench-ab-fused-norm.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  tcache_out ;;
s12e)  # session 12, call 4: the kernel tests of the paths this session changed, at real shapes (one-token partial
  # sums after the K loop, the folded norm's squares, picks timed on weight copies)
  TEST_TIMEOUT=150 tests ${TESTS_TIMEOUT:-330} 4 tests/test_kernels.py \
      -k "skinny or norm_skinny or swiglu or rope_triton or linear_rope or weight_copies or timed_pick or stream_us or lowrank_linear" ;;
s13e)  # session 13, call 6: decode-attention launch configs for the 30 % checkpoint at batch 16 and 1, end to end
  # (session 9's sweep and end-to-end runs disagreed on 64-key tiles at batch 16; pipeline depth and warps never
  # ran end to end at short contexts)
  ckpt
  timeout ${AB_TIMEOUT:-300} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      /tmp/l7b-30@MODEGPT_ATTN_CONFIG=32/4w/1s/cd /tmp/l7b-30@MODEGPT_ATTN_CONFIG=32/4w/3s/cd \
      /tmp/l7b-30@MODEGPT_ATTN_CONFIG=32/8w/2s/cd /tmp/l7b-30@MODEGPT_ATTN_CONFIG=32/2w/2s/cd \
      /tmp/l7b-30@MODEGPT_ATTN_CONFIG=16/4w/2s/cd /tmp/l7b-30@MODEGPT_ATTN_CONFIG=64/4w/3s/cd \
      --device cuda --dtype bfloat16 --batch 16 1 --steps 48 --rounds 3 --kv-cache-gb 4 --max-model-len 4096 \
      --json "$OUT/bench-ab-attn-configs.json" 2>&1 | tee "$OUT/bench-engine-h200.log" ;;
s13d)  # session 13, call 5: random:llama-2-13b against its 30 % checkpoint (the shapes of
  # kernels/shapes/llama-2-13b-30.config.json, random weights) with this session's defaults, batch 256/64/16/1
  SHAPES=kernels/shapes/llama-2-13b-30.config.json CKPT=/tmp/l13b-30 ckpt
  timeout ${AB_TIMEOUT:-420} $PY -m server.engine.bench_ab random:llama-2-13b /tmp/l13b-30 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 32 --rounds 3 --kv-cache-gb 30 --max-model-len 4096 \
      --json "$OUT/bench-ab-13b.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  tcache_out ;;
s13c)  # session 13, call 4 (at c0f9b63; MODEGPT_ATTN_VEC was removed after it measured slower): multi-head attention on the CUDA cores (MODEGPT_ATTN_VEC=1: one query row per
  # program, scores as products summed over the head dim, values accumulated in an fp32 tile summed once after
  # the loop) against the 16-row MMA tile with one useful row; batch 16 first
  ckpt
  timeout ${AB_TIMEOUT:-400} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      random:llama-2-7b@MODEGPT_ATTN_VEC=1 /tmp/l7b-30@MODEGPT_ATTN_VEC=1 \
      /tmp/l7b-30@MODEGPT_ATTN_CONFIG=64/4w/2s/cd/v /tmp/l7b-30@MODEGPT_ATTN_CONFIG=32/2w/2s/cd/v \
      --device cuda --dtype bfloat16 --batch 16 1 64 --steps 48 --rounds 3 --kv-cache-gb 4 --max-model-len 4096 \
      --json "$OUT/bench-ab-vec.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  tcache_out ;;
s13b)  # session 13, calls 2-3 (at 7bb3d54; MODEGPT_ATTN_PREFETCH was removed after it measured slower): a key tile's values and the next tile's block numbers loaded with its keys
  # (MODEGPT_ATTN_PREFETCH=1: one load round trip per tile instead of three in a row), RoPE inside attention
  # (MODEGPT_ROPE_ATTENTION=1, last measured in session 6), both; batch 16 first (10 engines of 8 GB KV each ran
  # out of the GPU's memory: seven of 4 GB)
  ckpt
  timeout ${AB_TIMEOUT:-540} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      random:llama-2-7b@MODEGPT_ATTN_PREFETCH=1 /tmp/l7b-30@MODEGPT_ATTN_PREFETCH=1 \
      random:llama-2-7b@MODEGPT_ROPE_ATTENTION=1 /tmp/l7b-30@MODEGPT_ROPE_ATTENTION=1 \
      /tmp/l7b-30@MODEGPT_ATTN_PREFETCH=1,MODEGPT_ROPE_ATTENTION=1 \
      --device cuda --dtype bfloat16 --batch 16 1 64 --steps 48 --rounds 3 --kv-cache-gb 4 --max-model-len 4096 \
      --json "$OUT/bench-ab-prefetch.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  tcache_out ;;
s13a)  # session 13, call 1, at commit 1e5f4e3 (DYN_PART was removed after it measured slower): decode attention at short contexts is latency-bound (the 30 %
  # checkpoint reads its K/V at 35 % of the ceiling at batch 16, the original at 48 %): more, shorter partitions
  # (MODEGPT_ATTN_PROGRAMS_PER_SM) spread over each sequence's own length (MODEGPT_ATTN_DYNAMIC_SPLIT=1), A/B at
  # batch 1/16/64, one process; then batch-16 timelines of the default
  ckpt
  timeout ${AB_TIMEOUT:-400} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      random:llama-2-7b@MODEGPT_ATTN_DYNAMIC_SPLIT=1,MODEGPT_ATTN_PROGRAMS_PER_SM=8 \
      /tmp/l7b-30@MODEGPT_ATTN_DYNAMIC_SPLIT=1,MODEGPT_ATTN_PROGRAMS_PER_SM=8 \
      /tmp/l7b-30@MODEGPT_ATTN_DYNAMIC_SPLIT=1,MODEGPT_ATTN_PROGRAMS_PER_SM=4 \
      --device cuda --dtype bfloat16 --batch 1 16 64 --steps 48 --rounds 3 --kv-cache-gb 8 --max-model-len 4096 \
      --json "$OUT/bench-ab-attn-splits.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  for b in ${TIMELINE_BATCHES:-16}; do timeline1 random:llama-2-7b $b original; timeline1 /tmp/l7b-30 $b compressed; done
  tcache_out ;;
s12d)  # prepared: where batch 16 and 64 steps go now, then the 13B A/B with the current defaults
  # (a random-weight twin of kernels/shapes/llama-2-13b-30.config.json)
  ckpt
  for b in ${TIMELINE_BATCHES:-16 64}; do timeline1 random:llama-2-7b $b original; timeline1 /tmp/l7b-30 $b compressed; done
  SHAPES=kernels/shapes/llama-2-13b-30.config.json CKPT=/tmp/l13b-30 ckpt
  timeout ${AB_TIMEOUT:-300} $PY -m server.engine.bench_ab random:llama-2-13b /tmp/l13b-30 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 32 --rounds 3 --kv-cache-gb 30 --max-model-len 4096 \
      --json "$OUT/bench-ab-13b.json" 2>&1 | tee -a "$OUT/bench-engine-h200.log"
  tcache_out ;;
s11d)  # session 11, last call (~7 device minutes left): the skinny configs timed with a small PDL kernel between
  # the repeated launches (call 3's back-to-back timing favoured few-program tiles at 16 tokens), the recorded
  # A/B, original against 30 %, batch 256/64/16/1; then graphs against eager for the llama family
  ckpt
  timeout ${AB_TIMEOUT:-230} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 \
      --json "$OUT/bench-ab-final.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  tcache_out
  TEST_TIMEOUT=110 tests ${TESTS_TIMEOUT:-115} 2 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "decode_equals_eager and llama or stream_us" ;;
s11c)  # session 11, call 3: the skinny kernel's configs timed back to back in a CUDA graph on rotating weight
  # copies (skinny_linear.tune_config; 4-row GEMV tiles added), and the MLP's SwiGLU epilogue against the
  # chain (MODEGPT_SWIGLU_EPILOGUE=0): original and 30 %, batch 256/64/16/1, one process; batch-1 timelines;
  # the kernel CUDA tests of this session's code
  ckpt
  timeout ${AB_TIMEOUT:-320} $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_SWIGLU_EPILOGUE=0 \
      /tmp/l7b-30 /tmp/l7b-30@MODEGPT_SWIGLU_EPILOGUE=0 --device cuda --dtype bfloat16 --batch 256 64 16 1 \
      --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 --json "$OUT/bench-ab-stream-tuned.json" 2>&1 \
      | tee "$OUT/bench-engine-h200.log"
  for b in ${TIMELINE_BATCHES:-1}; do timeline1 random:llama-2-7b $b original; timeline1 /tmp/l7b-30 $b compressed; done
  tcache_out
  TEST_TIMEOUT=100 tests ${TESTS_TIMEOUT:-110} 4 tests/test_kernels.py \
      -k "precompile or stream_us or weight_copies or strided or every_m1_tile or epilogue_switch or skinny_linear" ;;
s11b)  # session 11, call 2: the skinny kernel's tile configs timed in CUDA graphs after an L2 flush and a PDL
  # predecessor (graph_us as Triton's do_bench then; replaced by skinny_linear.tune_config in call 3), and
  # attention reading q through its strides (no copy per layer from batch 2): the recorded A/B, the step
  # timelines at batch 1 and 16, the CUDA tests
  ckpt
  timeout ${AB_TIMEOUT:-300} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 \
      --json "$OUT/bench-ab-graph-tuned.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  for b in ${TIMELINE_BATCHES:-1 16}; do timeline1 random:llama-2-7b $b original; timeline1 /tmp/l7b-30 $b compressed; done
  tcache_out
  TEST_TIMEOUT=100 tests ${TESTS_TIMEOUT:-130} 4 tests/test_kernels.py tests/test_engine_cuda.py \
      -k "precompile or stream_us or strided or decode_equals_eager or async_scheduling_through" ;;
s11a)  # session 11, call 1 (cold Triton cache: this checkout carried none): the recorded A/B, original against
  # 30 %, batch 256/64/16/1, then where a whole engine step's time goes at batch 1 and 16 (critical-path
  # shares of every GPU operation: server.engine.timeline), then the Triton cache back
  ckpt
  timeout ${AB_TIMEOUT:-330} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 \
      --json "$OUT/bench-ab-cold.json" 2>&1 | tee "$OUT/bench-engine-h200.log"
  for b in ${TIMELINE_BATCHES:-1 16}; do timeline1 random:llama-2-7b $b original; timeline1 /tmp/l7b-30 $b compressed; done
  tcache_out ;;
s10d)  # session 10, call 4: the product's target size. random:llama-2-13b compressed for real at 30 % (the
  # default rounding: 128 / 16; 64 x 1024 calibration ids, since the allocation of a random model does not
  # need more), then original against it in one process, batch 256/64/16/1, max_model_len 4096
  [ -d /tmp/l13b-30 ] || timeout ${COMPRESS_TIMEOUT:-200} $PY -c "from compressor.pipeline import CompressOptions, compress
compress('random:llama-2-13b', '/tmp/l13b-30', CompressOptions(ratio=0.3, device='cuda', calib_samples=64, calib_seqlen=1024, progress=False), overwrite=True)" 2>&1 | tail -3
  cp /tmp/l13b-30/config.json "$OUT/llama-2-13b-30.config.json"
  timeout ${AB_TIMEOUT:-360} $PY -m server.engine.bench_ab random:llama-2-13b /tmp/l13b-30 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 32 --rounds 3 --kv-cache-gb 30 --max-model-len 4096 \
      --json "$OUT/bench-ab-13b.json" 2>&1 | tee -a "$OUT/bench-engine-h200.log"
  tcache_out ;;
s10e)  # session 10, call 5: the skinny kernel up to 64 tokens (tokens padded to 32/64, shallower tiles; picked per
  # shape against cuBLAS as at 1-16) against cuBLAS at batch 64, original and 30 %, one process
  ckpt
  timeout ${AB_TIMEOUT:-400} $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_SKINNY_MAX_TOKENS=64 \
      /tmp/l7b-30 /tmp/l7b-30@MODEGPT_SKINNY_MAX_TOKENS=64 --device cuda --dtype bfloat16 --batch ${BATCHES:-64} \
      --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 --json "$OUT/bench-ab-skinny64.json" 2>&1 \
      | tee "$OUT/bench-engine-h200.log"
  TEST_TIMEOUT=100 tests ${TESTS_TIMEOUT:-100} 4 tests/test_kernels.py tests/test_skinny_rope.py -k "33 or 20"
  tcache_out ;;
s10f)  # session 10, last call: the recorded A/B with this session's defaults (the skinny kernel up to 64 tokens),
  # original against 30 %, batch 256/64/16/1
  ckpt
  timeout ${AB_TIMEOUT:-330} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 \
      --json "$OUT/bench-ab-final.json" 2>&1 | tee "$OUT/bench-engine-h200.log" ;;
s9c)  # session 9, call 2: async scheduling (decode steps launched ahead of the host) on/off for the original
  # and the 30 % checkpoint (one engine per model, the setting switched per round), the attention sweep
  # of several KV heads per program (KV_PACK) at ragged contexts, then the CUDA tests of async scheduling,
  # the graphs and the packed attention configs
  ckpt &
  attn_sweep ${SWEEP_TIMEOUT:-150} ${SWEEP_BUDGET:-115}
  wait
  timeout ${AB_TIMEOUT:-240} $PY -m server.engine.bench_ab random:llama-2-7b@MODEGPT_ASYNC_SCHEDULING=0 random:llama-2-7b \
      /tmp/l7b-30@MODEGPT_ASYNC_SCHEDULING=0 /tmp/l7b-30 --device cuda --dtype bfloat16 --batch 256 64 16 1 \
      --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 --json "$OUT/bench-ab-async.json" 2>&1 \
      | tee "$OUT/bench-engine-h200.log"
  TEST_TIMEOUT=100 tests ${TESTS_TIMEOUT:-110} 4 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "async or context_classes or equals_eager or launch_configs"
  tcache_out ;;
s9d)  # session 9, call 3: the recorded A/B, original against 30 %, with the new defaults (async scheduling,
  # KV heads packed per attention program from batch 16: auto_config) and with the previous attention
  # choice for these short contexts (32/4w/2s/cd), batch 256/64/16/1; then the CUDA tests of async
  # scheduling, of the attention launch configurations and of graphs against eager
  ckpt
  timeout ${AB_TIMEOUT:-330} $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_ATTN_CONFIG=32/4w/2s/cd \
      /tmp/l7b-30 /tmp/l7b-30@MODEGPT_ATTN_CONFIG=32/4w/2s/cd --device cuda --dtype bfloat16 --batch 256 64 16 1 \
      --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 --json "$OUT/bench-ab-kv-pack.json" 2>&1 \
      | tee "$OUT/bench-engine-h200.log"
  TEST_TIMEOUT=120 tests ${TESTS_TIMEOUT:-150} 4 tests/test_engine_cuda.py tests/test_kernels.py \
      -k "async or auto_config_by_batch or launch_configs or decode_equals_eager" ;;
s9e)  # session 9, call 5: with async scheduling and packed attention (the step is now matmul- and
  # attention-bound at batch 16-256), does re-rounding the 30 % checkpoint's widths to 128 (head dims to
  # 16; session 4: 2-4 % at batch 16-256 then) help? Original, 30 %, 30 % aligned, batch 256/64/16/1
  ckpt; ckpt_aligned 128 16
  timeout ${AB_TIMEOUT:-400} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 /tmp/l7b-30-a128 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 48 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 \
      --json "$OUT/bench-ab-align.json" 2>&1 | tee "$OUT/bench-engine-h200.log" ;;
s9f)  # session 9, last call: every engine CUDA test (graphs per context class, bf16, the kernel bridge, two
  # engines on one GPU, async scheduling) and the batch-dependent attention choice, after the session's changes
  TEST_TIMEOUT=180 tests ${TESTS_TIMEOUT:-200} 4 tests/test_engine_cuda.py \
      tests/test_kernels.py::test_triton_decode_attention_auto_config_by_batch ;;
s9a)  # session 9, call 1 (prepared in session 8): the shipped attention default (32-key tiles, head dims in 64 + 32
  # chunks) end to end, against the padded tiles, in one process, large batches first; then a batch-256
  # step profile of each model (where the step goes now)
  ckpt
  ab_dim_chunks ${AB_TIMEOUT:-330} 256 64 16 1
  PROFILE_KV_GB=16 PROFILE_BATCHES=256 profile ;;
s9b)  # prepared in session 8 for the next: the attention sweep of several KV heads per program (KV_PACK,
  # "/p<n>") at the 7B original's and the 30 % checkpoint's head dims, then its CUDA tests
  attn_sweep ${SWEEP_TIMEOUT:-200} ${SWEEP_BUDGET:-160}
  TEST_TIMEOUT=60 tests ${TESTS_TIMEOUT:-120} 4 tests/test_kernels.py -k "attention" ;;
s8e)  # session 8, last call (~7 device minutes left): the recorded original-vs-30 % A/B at max_model_len
  # 4096 with the final auto configuration (chunked head dims, key tiles from the chunk padding), large
  # batches first (s8d's A/B was cut after batch 1)
  ckpt
  timeout ${AB_TIMEOUT:-330} $PY -m server.engine.bench_ab random:llama-2-7b /tmp/l7b-30 \
      --device cuda --dtype bfloat16 --batch 256 64 16 1 --steps 32 --rounds 3 --kv-cache-gb 16 --max-model-len 4096 \
      --json "$OUT/bench-ab-final.json" 2>&1 | tee "$OUT/bench-engine-h200.log" ;;
s8b)  # prepared in session 7 for the next (the recorded run it could not finish): at a server's
  # max_model_len, graphs per context class (default) against one 4096-wide class, original and 30 %,
  # batch 1-256; then the fused projection + RoPE (MODEGPT_QKV_ROPE=1) against the default at 1 and 16
  ckpt
  timeout ${AB_TIMEOUT:-330} $PY -m server.engine.bench_ab random:llama-2-7b@MODEGPT_GRAPH_CONTEXTS=0 random:llama-2-7b \
      /tmp/l7b-30@MODEGPT_GRAPH_CONTEXTS=0 /tmp/l7b-30 --device cuda --dtype bfloat16 --batch 1 256 64 16 --steps 48 \
      --rounds 3 --kv-cache-gb 16 --max-model-len 4096 --json "$OUT/bench-ab-context-classes.json" 2>&1 \
      | tee "$OUT/bench-engine-h200.log"
  timeout ${AB2_TIMEOUT:-200} $PY -m server.engine.bench_ab random:llama-2-7b random:llama-2-7b@MODEGPT_QKV_ROPE=1 \
      /tmp/l7b-30 /tmp/l7b-30@MODEGPT_QKV_ROPE=1 --device cuda --dtype bfloat16 --batch 1 16 --steps 64 --rounds 4 \
      --kv-cache-gb 2 --max-model-len 4096 --json "$OUT/bench-ab-qkv-rope.json" 2>&1 | tee -a "$OUT/bench-engine-h200.log" ;;
all) engine 330; kernel_bench 110 90; tests 120 ;;
engine+failing) engine 330; timeout 90 $PY -m pytest -q -x -p no:cacheprovider --timeout 60 tests/test_engine_cuda.py 2>&1 | tee "$OUT/cuda-tests.log" ;;
compress13b)
  $PY -m compressor.cli bench compress random:llama-2-13b --ratio 0.3 --device cuda --workdir /tmp/bc \
      --json "$OUT/bench-compress-13b-h200.json" --quiet 2>&1 | tee "$OUT/bench-compress-13b.log"
  ;;
*) echo "usage: $0 MODE (modes: the header of this file; e.g. tests, kernels, engine, profile, s6c, attn-sweep)" >&2; exit 2 ;;
esac
