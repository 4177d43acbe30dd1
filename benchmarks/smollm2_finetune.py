"""SmolLM2-135M: held-out perplexity of source, converted, and both after the same short fine-tune.

    python benchmarks/smollm2_finetune.py [--steps 100] [--seq-len 128] [--batch-size 4]

Converted model: `ibnorm convert smollm2-135m --calib builtin:pydoc:train` (defaults). Fine-tune data:
builtin:pydoc:train; evaluation: builtin:pydoc:eval (16 blocks). The baseline is the same fine-tune
applied to the source model with its original RMSNorm (`ibnorm finetune SOURCE`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import ibnorm  # noqa: E402
from _common import print_and_save  # noqa: E402
from ibnorm.finetune import FinetuneOptions, finetune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--work", default="/tmp/smollm2-ft")
    ap.add_argument("--modes", nargs="+", default=["norms", "all"])
    ap.add_argument("--out", default="benchmarks/results/smollm2_finetune.md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    converted = work / "converted"
    if not converted.exists():
        ibnorm.convert_checkpoint("smollm2-135m", converted, ibnorm.ConvertOptions(calib="builtin:pydoc:train"))
    lrs = {"norms": 1e-3, "all": 5e-5}
    rows = []
    for mode in args.modes:
        for label, path in (("source (RMSNorm)", "smollm2-135m"), ("converted (IBNorm)", str(converted))):
            out = work / f"{'src' if path == 'smollm2-135m' else 'ib'}-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            opts = FinetuneOptions(data="builtin:pydoc:train", eval_data="builtin:pydoc:eval", steps=args.steps, out=str(out),
                                   eval_every=0, eval_blocks=16, train=mode, lr=lrs[mode], warmup=10, batch_size=args.batch_size,
                                   seq_len=args.seq_len, compare_source=False, force=True)
            r = finetune(path, opts)
            rows.append([label, mode, f"{lrs[mode]:g}", str(args.steps), f"{r.evals[0]['perplexity']:.3f}", f"{r.evals[-1]['perplexity']:.3f}",
                         f"{1000 * r.seconds / args.steps:.0f}", f"{r.tokens_per_second:.0f}"])
            print(rows[-1], flush=True)
    title = (f"SmolLM2-135M fine-tune on builtin:pydoc:train, held-out perplexity on builtin:pydoc:eval "
             f"(16 × {args.seq_len} tokens), batch {args.batch_size} × {args.seq_len}, CPU")
    print_and_save(args.out, title, ["model", "--train", "lr", "steps", "ppl before", "ppl after", "ms/step", "tokens/s"], rows)


if __name__ == "__main__":
    main()
