"""What conversion costs a user: the whole `ibnorm convert` process, calibrated and fixed-λ, in forward passes,
on two kinds of text.

    python benchmarks/convert_cli.py [--source smollm2-135m] [--calib builtin:pydoc:train --calib english]
        [--samples 32] [--seq-len 256] [--repeats 1] [--out benchmarks/results/convert_cli.md]

``english`` is a corpus of ordinary English prose built from text the installed packages ship
(benchmarks/english_corpus.py): harder for a code-and-web model than CPython's manual.

Per calibration text, each step as its own process (so imports, load and save are counted as a user sees them):

1. ``python -m ibnorm_cli convert SOURCE --calib DATA`` (default calibration), wall time;
2. ``python -m ibnorm_cli convert SOURCE --lam 0.25``: the same without any calibration, wall time (once);
3. a process that loads SOURCE the way ``convert`` does (timed: the load, shown separately) and then runs one
   forward pass over the calibration tokens, in ``convert``'s batches (timed: one forward).

Calibration cost in forward passes = (1 − 2) ÷ the forward of 3: everything calibration adds (capturing,
fitting, the end-to-end check and back-off) in units of one pass of the model over its data.  The manifest's
back-off trials (each: refit every norm, run the check samples through the model) are listed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import english_corpus  # noqa: E402
from _common import FORWARD_SCRIPT, print_and_save  # noqa: E402



def _run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} … failed:\n{proc.stderr.strip()[-2000:]}")
    return wall, proc.stdout


def _convert(source: str, extra: list[str], workdir: str, tag: str) -> tuple[float, dict]:
    out = os.path.join(workdir, tag)
    wall, stdout = _run([sys.executable, "-m", "ibnorm_cli", "convert", source, "--out", out, "--force", "--json", *extra])
    try:
        manifest = json.loads(stdout)
    except json.JSONDecodeError:
        manifest = {}
    return wall, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--calib", action="append", help="calibration text (repeatable); `english`: the local English corpus "
                    "(default: builtin:pydoc:train and english)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="convert's calibration batch size (ConvertOptions.batch_size)")
    ap.add_argument("--fixed-lam", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each process; the best is kept")
    ap.add_argument("--out", default="benchmarks/results/convert_cli.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        fixed = min(_convert(args.source, ["--lam", str(args.fixed_lam)], work, "fixed")[0] for _ in range(args.repeats))
        rows.append([f"`convert --lam {args.fixed_lam:g}` (whole process)", "-", f"{fixed:.1f}", "no calibration"])
        for calib in args.calib or ["builtin:pydoc:train", "english"]:
            data = calib
            if calib == "english":
                data = os.path.join(work, "english.txt")
                english_corpus.build(data)
            rows += _one_text(args, calib, data, fixed, work)
    title = (f"{args.source}: conversion as the user runs it, {args.samples}×{args.seq_len} calibration tokens, "
             f"best of {args.repeats}")
    print_and_save(args.out, title, ["what", "text", "seconds", "note"], rows)


def _one_text(args, calib: str, data: str, fixed: float, work: str) -> list[list[str]]:
    """The calibrated conversion on one text, and its cost in forward passes over the same tokens."""
    options = ["--calib", data, "--calib-samples", str(args.samples), "--seq-len", str(args.seq_len)]
    best: dict[str, float] = {}
    manifest: dict = {}
    for _ in range(args.repeats):
        wall, m = _convert(args.source, options, work, "calibrated")
        if wall < best.get("calibrated", float("inf")):
            best["calibrated"], manifest = wall, m
        _, stdout = _run([sys.executable, "-c", FORWARD_SCRIPT, args.source, data, str(args.samples), str(args.seq_len),
                          str(args.batch_size), "2"])
        fwd = json.loads(stdout.strip().splitlines()[-1])
        best["forward"] = min(fwd["forward_s"], best.get("forward", float("inf")))
        best["load"] = min(fwd["load_s"], best.get("load", float("inf")))
    extra = best["calibrated"] - fixed
    e2e = manifest.get("end_to_end") or {}
    trials = e2e.get("trials") or []
    trial_note = ", ".join(f"×{t['factor']:.3g}: {t['drift']:.2g} in {t['seconds']:.1f} s" for t in trials) or "none needed"
    return [
        ["`convert --calib` (whole process)", calib, f"{best['calibrated']:.1f}",
         f"manifest: {manifest.get('seconds', float('nan')):.1f} s conversion; drift {e2e.get('value', float('nan')):.3g} "
         f"(budget {e2e.get('budget')}), λ ×{e2e.get('backoff_factor', '?'):.3g}"],
        ["back-off trials (factor: drift in time)", calib, f"{sum(t['seconds'] for t in trials):.1f}", f"{len(trials)}: {trial_note}"],
        ["load of the source (separately)", calib, f"{best['load']:.1f}", "imports + load_source, as convert does"],
        [f"one forward over the {fwd['tokens']} calibration tokens", calib, f"{best['forward']:.2f}", f"batches of {args.batch_size}"],
        ["**calibration cost**", calib, f"{extra:.1f}", f"**{extra / best['forward']:.2f} forward passes** (target ≤ 3)"],
    ]


if __name__ == "__main__":
    main()
