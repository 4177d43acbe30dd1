"""``ibnorm study`` and ``ibnorm mi``: parse options, call ibnorm.study / ibnorm.mi, render."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .render import console, err_console, print_json, quiet_libraries, short_names, table, user_errors


def _parse_shard(shard: str) -> tuple[int, int]:
    from ibnorm.errors import IBNormError

    try:
        i, n = (int(v) for v in shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise IBNormError(f"--shard must be I/N with 0 ≤ I < N, got {shard!r}") from None
    return i, n


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
        quiet_libraries()
        from ibnorm.errors import IBNormError
        from ibnorm.study import NORMALIZERS, PRESETS, get_preset, run_study, write_report

        bad = [n for n in (only or []) if n not in NORMALIZERS]
        if bad:
            raise IBNormError(f"unknown normalizer {bad[0]!r}; choose from {', '.join(NORMALIZERS)}")
        if seeds is not None and seeds < 1:
            raise IBNormError("--seeds must be at least 1")
        try:
            p = get_preset(preset, seeds, tuple(only or ()), data)
        except KeyError:
            raise IBNormError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}") from None
        shard_ij = _parse_shard(shard)
        outp = Path(out)
        if outp.exists() and not outp.is_dir():
            raise IBNormError(f"--out {out} exists and is not a directory")
        if not report_only:
            outp.mkdir(parents=True, exist_ok=True)
            run_study(p, outp, None if json_out else _study_progress, jobs, shard_ij)
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
    scores, tests = [], []
    for r in result["summary"]:
        scores.append((r["task"], r["normalizer"], r["metric"], f"{r['mean']:.4g} ± {r['std']:.2g}", r["n"],
                       f"{r['s_per_step'] * 1000:.1f}"))
        if r.get("diff") is not None:
            tests.append((r["task"], r["normalizer"], f"{r['diff']:+.4g} ± {r['diff_std']:.2g}", r.get("p_value"),
                          r.get("verdict", ""), f"{r['lr']:g}/{r['wd']:g}"))
    console.print(table("study: test metric at each normalizer's best lr/wd (mean ± std over seeds)",
                        ("task", "normalizer", "metric", "mean ± std", "n", "ms/step"), scores, numeric=(3, 4, 5)))
    if tests:
        console.print(table("against the baseline (paired over seeds)",
                            ("task", "normalizer", "Δ", "p (paired t)", "verdict", "lr/wd"), tests, numeric=(2, 3)))


def mi(
    model: Optional[str] = typer.Argument(None, help="A source, converted or fine-tuned model."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", help="Further models, in order (e.g. converted, then fine-tuned)."),
    data: Optional[str] = typer.Option(None, "--data", help="Held-out text (or builtin:pydoc:eval) / an image folder with class subfolders."),
    tokens: int = typer.Option(4096, help="Tokens analysed (language models)."),
    images: int = typer.Option(1000, help="Images analysed (image classifiers)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per block (default: 256, or the model's positions if fewer)."),
    dims: int = typer.Option(4, help="Whitened principal components kept per side."),
    noise: float = typer.Option(0.5, help="σ of the noise added to T for I(X;T) (relative to unit-variance components)."),
    labels: int = typer.Option(31, help="Next-token classes kept for I(T;Y) (the rest pooled)."),
    estimator: str = typer.Option("ksg-bc", help="ksg-bc | ksg | renyi."),
    reps: int = typer.Option(3, help="Half-samples for the error bars (0: none)."),
    plot: str = typer.Option("information_plane.png", "--plot", help="Where to write the information-plane PNG."),
    trajectory: Optional[str] = typer.Option(None, "--trajectory", help="Plot a metrics.jsonl of `finetune --mi-every` instead."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet."),
    json_out: bool = typer.Option(False, "--json", help="Print the estimates as JSON."),
) -> None:
    """Information plane of every normalization layer: I(X;T) and I(T;Y) with error bars."""
    with user_errors():
        from ibnorm.errors import IBNormError

        if trajectory:
            _mi_trajectory(trajectory, plot, json_out)
            return
        if model is None or data is None:
            raise IBNormError("give MODEL and --data (or --trajectory metrics.jsonl)")
        from ibnorm.validate import check_not_special

        for path in (model, *(compare or []), data):  # before the first model is read
            check_not_special(path)
        from ibnorm.information import ESTIMATORS

        if estimator not in ESTIMATORS:
            raise IBNormError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
        if dims < 1 or noise <= 0 or tokens < 100 or reps < 0 or labels < 1:
            raise IBNormError("--dims ≥ 1, --noise > 0, --tokens ≥ 100, --labels ≥ 1 and --reps ≥ 0 are required")
        quiet_libraries()
        import ibnorm.mi as mi_mod
        from ibnorm.charts import render

        opts = mi_mod.MIOptions(data=data, tokens=tokens, seq_len=seq_len, images=images, dims=dims, noise=noise, labels=labels,
                                reps=reps, estimator=estimator, text_field=text_field)
        cache: dict = {}
        show = not json_out and err_console.is_terminal
        results = []
        for path in [model, *(compare or [])]:
            if not json_out:
                err_console.print(f"analysing {path} …", highlight=False)
            results.append(mi_mod.analyze(path, opts, cache, _mi_progress if show else None))
        Path(plot).write_bytes(render(mi_mod.plane_chart(results)))
    desc = mi_mod.describe(opts)
    if json_out:
        first = results[0]
        print_json({**desc, "model": first["model"], "layers": first["layers"],
                    "compare": [{"model": r["model"], "layers": r["layers"]} for r in results[1:]], "plot": plot})
        return
    _render_mi(results, desc)
    console.print(f"information plane: {plot}")


def _mi_progress(path: str, i: int, n: int) -> None:
    if i == n or i % 10 == 0:
        err_console.print(f"  {i}/{n} layers", highlight=False)


def _render_mi(results: list[dict], desc: dict) -> None:
    console.print(f"information plane per norm layer, nats ({desc['estimator']}); X: {desc['X']}; T: {desc['T']}; "
                  f"Y: {desc['Y']}; I(X;T) ≤ {desc['I_XT_bound']:.2f}", highlight=False)
    short = short_names([layer["name"] for layer in results[0]["layers"]])
    for r in results:  # one table per model: two columns of estimates fit 80 columns
        rows = [(short.get(layer["name"], layer["name"]),
                 *(f"{layer[k]:.3f} ± {layer.get(k + '_err', 0.0):.3f}" for k in ("I_XT", "I_TY"))) for layer in r["layers"]]
        console.print(table(str(r["model"]), ("layer", "I(X;T)", "I(T;Y)"), rows, numeric=(1, 2)))


def _mi_trajectory(path: str, plot: str, json_out: bool) -> None:
    import ibnorm.mi as mi_mod
    from ibnorm.charts import render

    records = mi_mod.read_trajectory(path)
    Path(plot).write_bytes(render(mi_mod.trajectory_chart(records)))
    if json_out:
        print_json({"trajectory": records, "plot": plot})
        return
    last = records[-1]
    short = short_names(list(last["mi"]))
    rows = [(short[name], records[0]["mi"].get(name, {}).get("I_XT"), v["I_XT"], records[0]["mi"].get(name, {}).get("I_TY"), v["I_TY"])
            for name, v in last["mi"].items()]
    console.print(table(f"information along training: step {records[0]['step']} → {last['step']} (nats)",
                        ("layer", "I(X;T) first", "last", "I(T;Y) first", "last"), rows, numeric=(1, 2, 3, 4)))
    console.print(f"trajectory plot: {plot}")
