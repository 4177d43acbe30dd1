"""``ibnorm study`` and ``ibnorm mi``: parse options, call ibnorm.study / ibnorm.mi, render."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .main import app
from .render import console, err_console, print_json, quiet_libraries, table, user_errors


def _parse_shard(shard: str) -> tuple[int, int]:
    from ibnorm.errors import IBNormError

    try:
        i, n = (int(v) for v in shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise IBNormError(f"--shard must be I/N with 0 ≤ I < N, got {shard!r}") from None
    return i, n


@app.command()
def study(
    preset: str = typer.Option(..., "--preset", help="micro | smoke | cpu | gpu-llama60m | gpu-llama130m | gpu-vision."),
    out: str = typer.Option(..., "--out", "-o", help="Study directory (runs are resumed from it; directories merge)."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Normalizer(s) to run (the baseline always runs)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per setting (default: the preset's)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Runs in parallel on this machine (default: the preset's)."),
    shard: str = typer.Option("0/1", "--shard", help="I/N: this job takes every N-th run (job arrays)."),
    data: Optional[str] = typer.Option(None, "--data", help="Text for the language-model tasks (default: builtin:pydoc)."),
    report_only: bool = typer.Option(False, "--report-only", help="Only aggregate the runs already in OUT."),
    json_out: bool = typer.Option(False, "--json", help="Print runs and summary as JSON."),
) -> None:
    """Train small models from scratch with each normalizer under one recipe; report mean ± std and paired tests."""
    with user_errors():
        from ibnorm.errors import IBNormError
        from ibnorm.study import NORMALIZERS, PRESETS, get_preset, run_study, write_report

        quiet_libraries()
        bad = [n for n in (only or []) if n not in NORMALIZERS]
        if bad:
            raise IBNormError(f"unknown normalizer {bad[0]!r}; choose from {', '.join(NORMALIZERS)}")
        if seeds is not None and seeds < 1:
            raise IBNormError("--seeds must be at least 1")
        try:
            p = get_preset(preset, seeds, tuple(only or ()), data)
        except KeyError:
            raise IBNormError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}") from None
        outp = Path(out)
        if outp.exists() and not outp.is_dir():
            raise IBNormError(f"--out {out} exists and is not a directory")
        if not report_only:
            outp.mkdir(parents=True, exist_ok=True)
            run_study(p, outp, None if json_out else _study_progress, jobs, _parse_shard(shard))
        elif not outp.is_dir():
            raise IBNormError(f"study directory not found: {out}")
        command = "ibnorm study " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        result = write_report(p, outp, command)
    if json_out:
        print_json({"runs": result["runs"], "summary": result["summary"], "lambda_curve": result["lambda_curve"]})
        return
    _render_study(result)
    console.print(f"written {outp / 'results.md'}, results.json, {', '.join(result['charts'])}")


def _study_progress(event: dict) -> None:
    if event["event"] == "run" and event["record"]:
        r = event["record"]
        value = "diverged" if r["diverged"] else f"{r['metric']} {r['value']:.4g} (val {r['val']:.4g})"
        err_console.print(f"{r['task']:<14} {r['normalizer']:<15} λ={r['lam']:<5g} lr={r['lr']:<7g} wd={r['wd']:<5g} "
                          f"seed {r['seed']}: {value}  {r['s_per_step'] * 1000:.1f} ms/step", highlight=False)
    elif event["event"] == "plan" and event["pending"]:
        err_console.print(f"[dim]{event['done']} runs finished, {event['pending']} to go now[/dim]", highlight=False)


def _render_study(result: dict) -> None:
    rows = []
    for r in result["summary"]:
        diff = "" if r.get("diff") is None else f"{r['diff']:+.4g} ± {r['diff_std']:.2g}"
        rows.append((r["task"], r["normalizer"], r["metric"], f"{r['mean']:.4g} ± {r['std']:.2g}", r["n"], f"{r['lr']:g}/{r['wd']:g}",
                     diff, r.get("p_value"), r.get("verdict", "reference"), f"{r['s_per_step'] * 1000:.1f}"))
    console.print(table("study: test metric at each normalizer's best lr/wd (mean ± std over seeds)",
                        ("task", "normalizer", "metric", "mean ± std", "n", "lr/wd", "Δ vs baseline", "p (paired t)", "verdict", "ms/step"), rows))
