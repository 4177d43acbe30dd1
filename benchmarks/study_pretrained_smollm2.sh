#!/usr/bin/env bash
# SmolLM2-135M: source norms vs the calibrated tanh conversion, norms-only and LoRA fine-tunes, 5 seeds,
# on builtin:english (WordNet glosses; calibration on builtin:pydoc:train). Sized for ~45 min on 2 shared
# CPU cores; on an idle machine raise --steps/--seq-len/--test-docs (see docs/findings.md).
set -euo pipefail
OUT=${OUT:-benchmarks/results/study_pretrained_smollm2}
COMMON=(--from smollm2-135m --data builtin:english:train --eval-data builtin:english:test --steps 8 --seeds 5
        --lrs 0.003 --lrs 0.01 --seq-len 32 --batch-size 2 --warmup 2 --val-blocks 4 --test-docs 16
        --calib builtin:pydoc:train --calib-samples 8 --threads 1 --jobs 2 --out "$OUT")
ibnorm study "${COMMON[@]}" --train norms
ibnorm study "${COMMON[@]}" --train lora
