#!/usr/bin/env bash
# The fused kernels alone on a GPU (H100/H200; torch + triton; no network): the first two steps of
# benchmarks/gpu_session.py (the session of record: every kernel test compiled, then the bandwidth
# table against the targets), then bench_kernels_gpu.py's wider table (the other ops, a learnable λ,
# the batch/group variants).
#
#   cd <repo root> && PYTHONPATH=. OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# Writes $OUT/summary.json, summary.md, kernel_tests.txt, session_log.txt, kernels_gpu.md and
# bench_log.txt, in under 6 minutes.
set -u
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
unset TRITON_INTERPRET IBNORM_BENCH_SMOKE
start=$(date +%s)
python benchmarks/gpu_session.py --out "$OUT" --steps kernel_tests,bandwidth --budget-s 200
echo "## benchmark"
timeout 150 python benchmarks/bench_kernels_gpu.py --out "$OUT/kernels_gpu.md" --budget-s 70 > "$OUT/bench_log.txt" 2>&1
echo "benchmark exit: $?" >> "$OUT/bench_log.txt"
tail -n 30 "$OUT/bench_log.txt"
echo "gpu_check done in $(( $(date +%s) - start )) s; results in $OUT"
