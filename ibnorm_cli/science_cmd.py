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
    preset: Optional[str] = typer.Option(None, "--preset", help="micro | smoke | cpu | confirm | gpu-llama60m | gpu-llama130m | gpu-check | gpu-vision."),
    out: str = typer.Option(..., "--out", "-o", help="Study directory (runs are resumed from it; directories merge)."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Normalizer(s) to run (the baseline always runs)."),
    task: Optional[List[str]] = typer.Option(None, "--task", help="--preset: only this task of the preset (repeatable); the report covers these."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per setting (default: the preset's)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Runs in parallel on this machine (default: the preset's)."),
    shard: str = typer.Option("0/1", "--shard", help="I/N: this job takes every N-th run (job arrays)."),
    data: Optional[str] = typer.Option(None, "--data", help="Text for the language-model tasks (default: the preset's)."),
    image_data: Optional[str] = typer.Option(None, "--image-data", help="Images for the vision tasks: a folder with one subfolder per class (default: digits)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="LM tasks: bytes | smollm2-135m | minilm-l6 | a tokenizer dir / .gguf."),
    report_only: bool = typer.Option(False, "--report-only", help="Only aggregate the runs already in OUT."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Seconds: then running runs checkpoint and stop; rerun to resume."),
    probe_edges: Optional[bool] = typer.Option(None, "--probe-edges/--no-probe-edges", help="--preset: after the study, one tuning-seed run a grid step beyond each lr chosen on the grid's edge (a diagnostic; default: the preset's)."),
    json_out: bool = typer.Option(False, "--json", help="Print runs and summary as JSON."),
    source: Optional[str] = typer.Option(None, "--from", help="Compare fine-tunes of this pretrained model: source norms vs IBNorm arms."),
    eval_data: Optional[str] = typer.Option(None, "--eval", "--eval-data", help="--from: held-out test text (default: a tenth of --data)."),
    arms: Optional[List[str]] = typer.Option(None, "--arms", help="--from: more arms, OP\\[@LAMBDA]\\[/GROUPING] (source and tanh always run)."),
    train: str = typer.Option("norms", "--train", help="--from: what trains: norms | all | lora."),
    steps: int = typer.Option(100, "--steps", help="--from: fine-tuning steps per run."),
    lrs: Optional[List[float]] = typer.Option(None, "--lrs", help="--from: learning-rate grid (default 1e-3 3e-3), searched on seed 0."),
    seq_len: int = typer.Option(128, "--seq-len", help="--from: tokens per example."),
    batch_size: int = typer.Option(4, "--batch-size", help="--from: examples per step."),
    warmup: int = typer.Option(10, "--warmup", help="--from: warmup steps."),
    val_blocks: int = typer.Option(16, "--val-blocks", help="--from: validation examples (LR selection)."),
    test_docs: int = typer.Option(64, "--test-docs", help="--from: test documents (the paired bootstrap resamples them)."),
    calib: str = typer.Option("builtin:pydoc:train", "--calib", help="--from: calibration text of the converted arms."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="--from: calibration examples."),
    save_every: int = typer.Option(0, "--save-every", help="--from: checkpoint every N steps (0: only when interrupted)."),
    threads: int = typer.Option(0, "--threads", help="--from: torch threads per run (0: torch's default)."),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="--from: run each run under torchrun | accelerate."),
) -> None:
    """Train small models from scratch with each normalizer under one recipe (--preset), or compare fine-tunes of a
    pretrained model with its own norms and with IBNorm (--from); report paired tests and verdicts."""
    with user_errors():
        quiet_libraries()
        from ibnorm.errors import IBNormError
        from ibnorm.study import NORMALIZERS, PRESETS, get_preset, run_study, write_report

        if (preset is None) == (source is None):
            raise IBNormError("give exactly one of --preset (from scratch) or --from SOURCE (a pretrained model)")
        if source is not None and task:
            raise IBNormError("--task selects tasks of a --preset; --from has none")
        if source is not None:
            _pretrained_study(source, data, eval_data, tuple(arms or ()), train, steps, seeds, tuple(lrs or ()), seq_len,
                              batch_size, warmup, val_blocks, test_docs, calib, calib_samples, save_every, threads, jobs,
                              launcher, out, shard, report_only, json_out)
            return
        bad = [n for n in (only or []) if n not in NORMALIZERS]
        if bad:
            raise IBNormError(f"unknown normalizer {bad[0]!r}; choose from {', '.join(NORMALIZERS)}")
        if seeds is not None and seeds < 1:
            raise IBNormError("--seeds must be at least 1")
        if time_limit is not None and not time_limit > 0:
            raise IBNormError("--time-limit must be a positive number of seconds")
        try:
            p = get_preset(preset, seeds, tuple(only or ()), data, tokenizer, image_data, tuple(task or ()))
        except KeyError:
            raise IBNormError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}") from None
        except ValueError as e:
            raise IBNormError(str(e)) from None
        if probe_edges is not None:
            p.probe_edges = probe_edges
        shard_ij = _parse_shard(shard)
        outp = Path(out)
        if outp.exists() and not outp.is_dir():
            raise IBNormError(f"--out {out} exists and is not a directory")
        if not report_only:
            _check_lm_inputs(p)
            outp.mkdir(parents=True, exist_ok=True)
            complete = run_study(p, outp, None if json_out else _study_progress, jobs, shard_ij, time_limit)
            if not complete and not json_out:
                err_console.print("time limit reached: unfinished runs saved checkpoints; run the same command again to resume")
        elif not outp.is_dir():
            raise IBNormError(f"study directory not found: {out}")
        command = "ibnorm study " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        result = write_report(p, outp, command)
    if json_out:
        print_json({k: result[k] for k in ("protocol", "runs", "summary", "lambda_curve", "edge_probes", "extended", "information_plane", "warnings")})
        return
    _render_study(result)
    console.print(f"written {outp / 'results.md'}, results.json, {', '.join(result['charts'])}")


def _check_lm_inputs(p) -> None:
    """Before any run: the LM tasks' text exists (e.g. confirm's builtin:english) and their tokenizer loads."""
    from ibnorm.data import check_text_data
    from ibnorm.errors import IBNormError
    from ibnorm.study.data import load_tokenizer

    lm = [t for t in p.tasks if t["kind"] == "lm"]
    if any(t["data"] is None for t in lm):
        raise IBNormError(f"preset {p.name} needs --data: a local text corpus (docs/information.md, building a local corpus)")
    for source in sorted({t["data"] for t in lm}):
        check_text_data(source)
    for name in sorted({t.get("tokenizer") for t in lm} - {None, "bytes"}):
        load_tokenizer(name)
    from ibnorm.study.data import image_shape

    for t in p.tasks:
        if t["kind"] != "lm" and image_shape(t)[1] < 2:
            raise IBNormError(f"{t['data']}: an image task needs one subdirectory per class (at least two)")


def _study_progress(event: dict) -> None:
    if event["event"] == "run" and event["record"]:
        r = event["record"]
        value = "diverged" if r["diverged"] else f"{r['metric']} {r['value']:.4g} (val {r['val']:.4g})"
        err_console.print(f"{r['task']:<14} {r['normalizer']:<15} λ={r['lam']:<5g} lr={r['lr']:<7g} wd={r['wd']:<5g} "
                          f"seed {r['seed']}: {value}  {r['s_per_step'] * 1000:.1f} ms/step", highlight=False)
    elif event["event"] == "paused":
        c = event["config"]
        err_console.print(f"{c['task']['name']:<14} {c['normalizer']:<15} seed {c['seed']}: checkpointed at the time limit", highlight=False)
    elif event["event"] == "plan" and event["pending"]:
        err_console.print(f"[dim]{event['done']} runs finished, {event['pending']} to go now[/dim]", highlight=False)


def _render_study(result: dict) -> None:
    scores, tests = [], []
    for r in result["summary"]:
        iv = r.get("interval")
        scores.append((r["task"], r["normalizer"], r["metric"],
                       "diverged" if r["mean"] is None else f"{r['mean']:.4g} ± {r['std']:.2g}", r["n"],
                       f"{r['s_per_step'] * 1000:.1f}"))
        if r.get("delta") is not None:
            diff = f"{r['delta']:+.3g}" + ("" if iv is None else f" [{iv[0]:+.2g}, {iv[1]:+.2g}]")
            tests.append((r["task"], r["normalizer"], diff, r.get("p_holm"), r.get("verdict", ""), f"{r['lr']:g}/{r['wd']:g}"))
    console.print(table("study: test metric at each normalizer's selected lr/wd (mean ± std over seeds)",
                        ("task", "normalizer", "metric", "mean ± std", "n", "ms/step"), scores, numeric=(3, 4, 5)))
    if tests:
        console.print(table("against the baseline: Δ test loss (LLaMA) or accuracy, paired over seeds [interval], "
                            "Holm-corrected p", ("task", "normalizer", "Δ [interval]", "p Holm", "verdict", "lr/wd"),
                            tests, numeric=(3,)))
    for w in result.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


def _pretrained_study(source: str, data: Optional[str], eval_data: Optional[str], arms: tuple, train: str, steps: int,
                      seeds: Optional[int], lrs: tuple, seq_len: int, batch_size: int, warmup: int, val_blocks: int,
                      test_docs: int, calib: str, calib_samples: int, save_every: int, threads: int, jobs: Optional[int],
                      launcher: Optional[str], out: str, shard: str, report_only: bool, json_out: bool) -> None:
    """``study --from``: validate everything, prepare the arms, run, report (inside ``user_errors``)."""
    import time

    from ibnorm.finetune import TRAIN_MODES
    from ibnorm.study.pretrained import PretrainedStudy, check_out, parse_arms, prepare, run_study
    from ibnorm.study.pretrained_report import write_report
    from ibnorm.validate import validate_pretrained_study

    t0 = time.perf_counter()
    validate_pretrained_study(data=data, eval_data=eval_data, train=train, train_modes=TRAIN_MODES, steps=steps, seeds=seeds,
                              lrs=lrs, seq_len=seq_len, batch_size=batch_size, warmup=warmup, val_blocks=val_blocks,
                              test_docs=test_docs, calib=calib, calib_samples=calib_samples, save_every=save_every,
                              threads=threads, jobs=jobs, launcher=launcher)
    study = PretrainedStudy(source, data, Path(out), eval_data, parse_arms(arms), train, steps, seeds or 5,
                            lrs or (1e-3, 3e-3), seq_len, batch_size, warmup, val_blocks=val_blocks, test_docs=test_docs,
                            calib=calib, calib_samples=calib_samples, save_every=save_every, threads=threads or _threads(),
                            jobs=jobs or 1, launcher=launcher)
    shard_ij = _parse_shard(shard)
    check_out(study)
    if report_only and not (study.out / "study.json").exists():
        raise IBNormError(f"study directory not found: {out}")
    if not report_only:
        progress = None if json_out else _pretrained_progress
        prepare(study, progress)
        run_study(study, progress, shard_ij)
    command = "ibnorm study " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    result = write_report(study, command, time.perf_counter() - t0)
    if json_out:
        print_json({"runs": result["runs"], "summary": result["summary"], "comparisons": result["comparisons"]})
        return
    _render_verdicts(result)
    console.print(f"written {study.out / 'results.md'}, results.json, {', '.join(result['charts'])}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _pretrained_progress(event: dict) -> None:
    if event["event"] == "arm":
        err_console.print(f"[dim]preparing arm {event['arm']}[/dim]", highlight=False)
    elif event["event"] == "run" and event["record"]:
        r = event["record"]
        what = "step 0" if r["step"] == 0 else f"{r['train']} lr={r['lr']:g} seed {r['seed']}"
        err_console.print(f"{r['arm']:<14} {what:<28} val {r['val']:.4f}  test {r['test']:.4f}  {r['seconds']:.0f}s", highlight=False)
    elif event["event"] == "plan" and event["pending"]:
        err_console.print(f"[dim]{event['done']} runs finished, {event['pending']} to go now[/dim]", highlight=False)


def _render_verdicts(result: dict) -> None:
    """One screen, 80 columns: the verdict per --train mode and arm, then the step-0 row."""
    rows = []
    for c in result["comparisons"]:
        iv = "-" if c["interval"] is None else f"{c['interval'][0]:+.4f},{c['interval'][1]:+.4f}"
        p = "-" if c["p_holm"] is None else f"{c['p_holm']:.2g}"
        rows.append((f"{c['train']}:{c['arm']}", f"{c['delta']:+.4f}", iv, p, c["verdict"]))
    level = result["comparisons"][0]["level"] if result["comparisons"] else 0.95
    console.print(table(f"test loss, arm − source, paired over seeds ({level:.0%} interval)",
                        ("train:arm", "Δ", "interval", "p Holm", "verdict"), rows, numeric=(1, 3)))
    step0 = [(r["arm"], f"{r['val']:.4f}", f"{r['test']:.4f}") for r in result["summary"] if r["step"] == 0]
    console.print(table("step 0 (before fine-tuning)", ("arm", "val loss", "test loss"), step0, numeric=(1, 2)))


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
    reps: int = typer.Option(8, help="Half-samples for the error bars (0: none); the bars state n."),
    projection: str = typer.Option("shared", help="I(X;T): shared (T on X's principal axes) | own (each side on its own)."),
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
        if projection not in ("shared", "own"):
            raise IBNormError(f"--projection must be shared or own, got {projection!r}")
        if dims < 1 or noise <= 0 or tokens < 100 or reps < 0 or labels < 1:
            raise IBNormError("--dims ≥ 1, --noise > 0, --tokens ≥ 100, --labels ≥ 1 and --reps ≥ 0 are required")
        quiet_libraries()
        import ibnorm.mi as mi_mod
        from ibnorm.charts import render

        opts = mi_mod.MIOptions(data=data, tokens=tokens, seq_len=seq_len, images=images, dims=dims, noise=noise, labels=labels,
                                reps=reps, estimator=estimator, text_field=text_field, projection=projection)
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
    console.print(f"information plane per norm layer, nats ± error bar ({desc['error_bars']}; {desc['estimator']}); X: {desc['X']}; T: {desc['T']}; "
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
