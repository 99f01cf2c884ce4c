#!/usr/bin/env bash
# The GPU acceptance runs of issues 3 and 4, as run on the lent H200 (see docs/BENCHMARKS.md).
# Usage (repository root, on the GPU machine; results go to $OUT or ./runs):
#   bash kernels/run_h200.sh kernels   # CUDA tests at real shapes + every kernel vs its PyTorch/cuBLAS baseline
#   bash kernels/run_h200.sh engine    # random:llama-2-7b vs its 30% checkpoint, kernels off/on, HF generate
#   bash kernels/run_h200.sh compress13b  # 13B compression wall time and peak memory
#   bash kernels/run_h200.sh all       # engine, kernel bench, tests: each under its own timeout
set -uo pipefail
OUT=${OUT:-runs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

tests() {  # every test bounded: a hang costs 60 s, not the lease
  timeout "${1:-150}" $PY -m pytest -q -p no:cacheprovider --timeout 60 -o log_cli=false -rfE \
      tests/test_engine_cuda.py tests/test_kernels.py 2>&1 | tee "$OUT/cuda-tests.log"
}
kernel_bench() {
  timeout "${1:-200}" $PY -c "from kernels.bench import run_kernel_bench; run_kernel_bench('$OUT/kernels-h200.json', time_budget_s=${2:-150})" \
      2>&1 | tee "$OUT/kernels-h200.log"
}
engine() {  # the bench via its Python entry points: the GPU image has no pydantic/fastapi for the full CLI
  timeout "${1:-330}" $PY - "$OUT" <<'PYEOF' 2>&1 | tee "$OUT/bench-engine-h200.log"
import argparse, sys
from compressor.pipeline import CompressOptions, compress
from server.bench_engine import add_engine_bench
compress("random:llama-2-7b", "/tmp/l7b-30", CompressOptions(ratio=0.3, device="cuda", progress=False), overwrite=True)
p = argparse.ArgumentParser(); add_engine_bench(p.add_subparsers())
a = p.parse_args(["engine", "random:llama-2-7b", "/tmp/l7b-30", "--device", "cuda", "--batch", "1", "16", "64", "256",
                  "--kernels", "both", "--hf-generate", "--kv-cache-gb", "40", "--json", sys.argv[1] + "/bench-engine-h200.json"])
a.func(a)
PYEOF
}

case "${1:-}" in
kernels) tests 300; kernel_bench ;;
engine) engine ;;
all) engine 330; kernel_bench 110 90; tests 120 ;;
engine+failing) engine 330; timeout 90 $PY -m pytest -q -x -p no:cacheprovider --timeout 60 tests/test_engine_cuda.py 2>&1 | tee "$OUT/cuda-tests.log" ;;
compress13b)
  $PY -m compressor.cli bench compress random:llama-2-13b --ratio 0.3 --device cuda --workdir /tmp/bc \
      --json "$OUT/bench-compress-13b-h200.json" --quiet 2>&1 | tee "$OUT/bench-compress-13b.log"
  ;;
*) echo "usage: $0 kernels|engine|compress13b" >&2; exit 2 ;;
esac
