#!/usr/bin/env bash
# The one prepared GPU check for the fused kernels (H100/H200; torch + triton installed; no network).
#
#   cd <repo root> && PYTHONPATH=. OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# Writes $OUT/gpu_tests.txt (every test of tests/test_kernels.py with compiled kernels, including the
# GPU tests at H = 8192, 16384, 65536) and $OUT/kernels_gpu.md (benchmark table), plus
# $OUT/bench_log.txt.  Kernel compilation dominates the test time, so the tests run as 8 parallel
# pytest shards (Triton's cache is shared and safe for concurrent writers).  Each step has its own
# timeout and the whole script stays under 6 minutes (150 s tests + 170 s benchmark + start-up).
set -u
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
export IBNORM_GPU_TESTS=1
unset TRITON_INTERPRET IBNORM_BENCH_SMOKE
start=$(date +%s)
work=$(mktemp -d)
SHARDS=8

{
  echo "# gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} > "$OUT/gpu_tests.txt" 2>&1

python -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels.py 2>/dev/null | grep '::' > "$work/ids.txt"
echo "collected $(wc -l < "$work/ids.txt") tests; running in $SHARDS shards" >> "$OUT/gpu_tests.txt"
for i in $(seq 0 $((SHARDS - 1))); do
  awk -v n=$SHARDS -v i=$i 'NR % n == i' "$work/ids.txt" > "$work/shard$i.txt"
  if [ -s "$work/shard$i.txt" ]; then
    mapfile -t ids < "$work/shard$i.txt"  # one test id a line (ids may hold spaces)
    timeout 150 python -m pytest -q -p no:cacheprovider -rfE "${ids[@]}" > "$work/shard$i.log" 2>&1 &
  fi
done
wait
for i in $(seq 0 $((SHARDS - 1))); do
  [ -f "$work/shard$i.log" ] && { echo; echo "## shard $i"; cat "$work/shard$i.log"; } >> "$OUT/gpu_tests.txt"
done
{
  echo
  echo "## summary (tests $(( $(date +%s) - start )) s)"
  grep -hE "^(FAILED|ERROR)" "$work"/shard*.log || true
  grep -hE "(passed|failed|error)" "$work"/shard*.log | grep -E " in [0-9.]+s" || true
} >> "$OUT/gpu_tests.txt"
tail -n 30 "$OUT/gpu_tests.txt"

echo "## benchmark"
timeout 170 python benchmarks/bench_kernels_gpu.py --out "$OUT/kernels_gpu.md" --budget-s 80 > "$OUT/bench_log.txt" 2>&1
echo "benchmark exit: $?" >> "$OUT/bench_log.txt"
tail -n 30 "$OUT/bench_log.txt"
rm -rf "$work"
echo "gpu_check done in $(( $(date +%s) - start )) s; results in $OUT"
