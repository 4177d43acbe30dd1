#!/usr/bin/env bash
# SmolLM2-135M's information plane with `ibnorm mi`'s current defaults (shared projection for I(X;T),
# 8 half-samples per error bar): source vs the data-free λ = 0.3 conversion, vs the calibrated conversion,
# and the λ = 0.3 model after 40 norm-only fine-tuning steps. Writes the --json outputs and the combined
# table into OUT (docs/findings.md, section 2, quotes them; tests/test_docs_figures.py checks it).
set -euo pipefail
OUT=${OUT:-benchmarks/results/mi_smollm2}
TMP=${TMP:-$(mktemp -d)}
MI=(--data builtin:pydoc:eval --tokens 2048 --json)
mkdir -p "$OUT"
ibnorm convert smollm2-135m --lam 0.3 --out "$TMP/sm-ib" --force > /dev/null
ibnorm convert smollm2-135m --calib builtin:pydoc:train --out "$TMP/sm-cal" --force > /dev/null  # calibrated
cp "$TMP/sm-cal/ibnorm_manifest.json" "$OUT/calibrated_manifest.json"  # its λ per layer and end-to-end KL
ibnorm finetune "$TMP/sm-ib" --data builtin:pydoc:train --eval builtin:pydoc:eval --steps 40 --train norms \
    --batch-size 4 --seq-len 128 --eval-every 40 --warmup 5 --out "$TMP/sm-ib-ft" --no-source --force > /dev/null
cp "$TMP/sm-ib-ft/metrics.jsonl" "$OUT/finetune_metrics.jsonl"  # held-out perplexity before and after
ibnorm mi smollm2-135m --compare "$TMP/sm-ib" "${MI[@]}" --plot "$TMP/p1.png" > "$OUT/source_vs_lam0.3.json"
ibnorm mi smollm2-135m --compare "$TMP/sm-cal" "${MI[@]}" --plot "$TMP/p2.png" > "$OUT/source_vs_calibrated.json"
ibnorm mi "$TMP/sm-ib-ft" "${MI[@]}" --plot "$TMP/p3.png" > "$OUT/finetuned.json"
python benchmarks/mi_smollm2_combine.py "$OUT"
