"""What conversion costs a user: the whole `ibnorm convert` process, calibrated and fixed-λ, in forward passes.

    python benchmarks/convert_cli.py [--source smollm2-135m] [--calib builtin:pydoc:train] [--samples 32] [--seq-len 256]
        [--repeats 1] [--out benchmarks/results/convert_cli.md]

In one run, each as its own process (so imports, load and save are counted as a user sees them):

1. ``python -m ibnorm_cli convert SOURCE --calib DATA`` (default calibration), wall time;
2. ``python -m ibnorm_cli convert SOURCE --lam 0.25``: the same without any calibration, wall time;
3. a process that loads SOURCE the way ``convert`` does (timed: the load, shown separately) and then runs one
   forward pass over the calibration tokens, in ``convert``'s batches (timed: one forward).

Calibration cost in forward passes = (1 − 2) ÷ the forward of 3: everything calibration adds (capturing,
fitting, the end-to-end check and back-off) in units of one pass of the model over its data.
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
    ap.add_argument("--calib", default="builtin:pydoc:train")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="convert's calibration batch size (ConvertOptions.batch_size)")
    ap.add_argument("--fixed-lam", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each process; the best is kept")
    ap.add_argument("--out", default="benchmarks/results/convert_cli.md")
    args = ap.parse_args()
    data = ["--calib", args.calib, "--calib-samples", str(args.samples), "--seq-len", str(args.seq_len)]
    best: dict[str, float] = {}
    manifest: dict = {}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.repeats):
            wall, m = _convert(args.source, data, work, "calibrated")
            if wall < best.get("calibrated", float("inf")):
                best["calibrated"], manifest = wall, m
            wall, _ = _convert(args.source, ["--lam", str(args.fixed_lam)], work, "fixed")
            best["fixed"] = min(wall, best.get("fixed", float("inf")))
            _, stdout = _run([sys.executable, "-c", FORWARD_SCRIPT, args.source, args.calib, str(args.samples), str(args.seq_len),
                              str(args.batch_size), "2"])
            fwd = json.loads(stdout.strip().splitlines()[-1])
            best["forward"] = min(fwd["forward_s"], best.get("forward", float("inf")))
            best["load"] = min(fwd["load_s"], best.get("load", float("inf")))
    extra = best["calibrated"] - best["fixed"]
    passes = extra / best["forward"]
    e2e = manifest.get("end_to_end") or {}
    rows = [
        ["`convert --calib` (whole process)", f"{best['calibrated']:.1f}", f"manifest: {manifest.get('seconds', float('nan')):.1f} s conversion; "
         f"back-off ×{e2e.get('backoff_factor', '?')}"],
        [f"`convert --lam {args.fixed_lam:g}` (whole process)", f"{best['fixed']:.1f}", "no calibration"],
        ["load of the source (separately)", f"{best['load']:.1f}", "imports + load_source, as convert does"],
        [f"one forward over the {fwd['tokens']} calibration tokens", f"{best['forward']:.2f}", f"batches of {args.batch_size}"],
        ["**calibration cost**", f"{extra:.1f}", f"**{passes:.2f} forward passes** (target ≤ 3)"],
    ]
    title = (f"{args.source}: conversion as the user runs it, {args.samples}×{args.seq_len} calibration tokens "
             f"({args.calib}), best of {args.repeats}")
    print_and_save(args.out, title, ["what", "seconds", "note"], rows)


if __name__ == "__main__":
    main()
