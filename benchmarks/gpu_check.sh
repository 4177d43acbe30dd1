#!/usr/bin/env bash
# The one prepared GPU check for the fused kernels (H100/H200; torch + triton installed; no network).
#
#   cd <repo root> && PYTHONPATH=. OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# Writes $OUT/gpu_tests.txt (compiled-kernel tests, GPU tests at H = 8192, 16384, 65536) and
# $OUT/kernels_gpu.md (benchmark table), plus $OUT/bench_log.txt.  Every step has its own timeout;
# the whole script stays under 6 minutes (110 + 70 + 160 s plus start-up).
set -u
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
export IBNORM_GPU_TESTS=1
unset TRITON_INTERPRET IBNORM_BENCH_SMOKE
start=$(date +%s)

{
  echo "# gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  echo
  echo "## GPU tests (wide rows, large λ, λ = 0 exactness)"
  timeout 110 python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k gpu -rfEs --durations=5
  echo "exit: $?"
  echo
  echo "## Remaining kernel tests, compiled on the GPU"
  timeout 70 python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not gpu" -rfE --durations=5
  echo "exit: $?"
} > "$OUT/gpu_tests.txt" 2>&1
cat "$OUT/gpu_tests.txt"

echo "## benchmark"
timeout 160 python benchmarks/bench_kernels_gpu.py --out "$OUT/kernels_gpu.md" --budget-s 70 > "$OUT/bench_log.txt" 2>&1
echo "benchmark exit: $?" >> "$OUT/bench_log.txt"
tail -n 40 "$OUT/bench_log.txt"
echo "gpu_check done in $(( $(date +%s) - start )) s; results in $OUT"
