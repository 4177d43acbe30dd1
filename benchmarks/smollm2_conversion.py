"""SmolLM2-135M: held-out perplexity of source vs converted, λ statistics, and the trade-off over --tolerance.

    python benchmarks/smollm2_conversion.py [--tolerances 0.0003 0.001 0.003] [--budget 0.01]

Calibration: builtin:pydoc:train (32 × 256 tokens); evaluation: builtin:pydoc:eval (8192 tokens, window
512, stride 256). Each row converts a fresh copy of the source model in memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import ibnorm  # noqa: E402
from _common import print_and_save  # noqa: E402
from ibnorm import evaluate  # noqa: E402
from ibnorm.data import read_texts, token_examples  # noqa: E402
from ibnorm.io.sources import load_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tolerances", type=float, nargs="+", default=[0.0003, 0.001, 0.003])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.01, float("inf")])
    ap.add_argument("--op", default="tanh")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/results/smollm2_conversion.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    t = time.perf_counter()
    source = load_source("smollm2-135m")
    load_s = time.perf_counter() - t
    ids = token_examples(source.tokenizer, read_texts("builtin:pydoc:eval"), 512, args.eval_tokens // 512).reshape(-1)
    base = evaluate.perplexity(source.model, ids, window=512)["perplexity"]
    columns = ["tolerance", "budget", "λ mean", "channels λ≥0.1", "layers with ≥50% channels λ≥0.1", "KL nats/tok",
               "back-off", "ppl source", "ppl converted", "Δ ppl", "convert s"]
    rows = []
    for budget in args.budgets:
        for tol in args.tolerances:
            loaded = copy.copy(source)
            loaded.model = copy.deepcopy(source.model)
            opts = ibnorm.ConvertOptions(calib="builtin:pydoc:train", calib_samples=32, seq_len=256, tolerance=tol, budget=budget, op=args.op)
            res = ibnorm.convert_model(loaded, opts)
            ppl = evaluate.perplexity(loaded.model, ids, window=512)["perplexity"]
            lam = torch.cat([m.effective_lam.reshape(-1) for m in loaded.model.modules() if isinstance(m, ibnorm.IBNormBase)])
            layers_ok = sum(r.frac_lam_ge_0_1 >= 0.5 for r in res.layers)
            rows.append([f"{tol:g}", f"{budget:g}", f"{lam.mean():.3f}", f"{100 * (lam >= 0.1).float().mean():.1f}%",
                         f"{layers_ok}/{len(res.layers)}", f"{res.end_to_end['value']:.4f}", f"×{res.end_to_end['backoff_factor']}",
                         f"{base:.3f}", f"{ppl:.3f}", f"{100 * (ppl / base - 1):+.2f}%", f"{res.seconds:.1f}"])
            print(rows[-1], flush=True)
    title = f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized fp32), op {args.op}: calibrated conversion (model load {load_s:.1f} s, not included)"
    print_and_save(args.out, title, columns, rows)


if __name__ == "__main__":
    main()
