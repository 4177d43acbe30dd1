"""Aggregate a study directory: the configuration each normalizer selected, mean ± std over seeds, paired
comparisons with the baseline through :mod:`.stats` (Holm-corrected across each table), the λ curve,
convergence, results.md / results.json and PNG charts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..charts import Chart, Series, render
from . import edges, stats
from .presets import Preset
from .runner import LAMBDA_CURVE_NORMALIZER, Tuning, extended_choice, lambda_points, load_run, seed_configs, tuning
from .selection import TIE_RULE, Selection
from .train import LOWER_IS_BETTER, metric_of

RUN_FIELDS = ("task", "normalizer", "seed", "metric", "value", "val", "val_loss", "test_loss", "lam", "lr", "wd", "diverged",
              "mean_lambda", "s_per_step", "activation_mib", "peak_mem_mib", "params")
ALPHA = 0.05
CONVERGED_RTOL = 0.01  # "not converged": validation loss fell by more than 1% over the last 10% of steps


def protocol(p: Preset) -> dict:
    """What the tables mean, written into results.json."""
    return {"selection": TIE_RULE, "seeds": p.seed_numbers(), "tuning_seed": p.first_seed,
            "budget": "the lr × wd grid at the preset's λ, then as many extra configurations at the chosen wd for every "
                      "normalizer: IBNorm-T's other λ values × every lr, the others' learning rates log-spaced inside the grid",
            "lambda_curve": "each λ point runs on every seed at its own lr (and the grid's wd), chosen on validation loss",
            "compared": "LLaMA: test loss (nats/token; Δ ≈ relative perplexity change); digits: test accuracy",
            "statistics": f"paired by seed; two-sided paired t-test (exact sign-flip when the differences have no variance); "
                          f"Holm across the rows of each table at family-wise α = {ALPHA}; interval: bootstrap over seeds and "
                          "test windows / images when every run stored them, else the t-interval over seeds",
            "convergence": f"relative fall of the validation-sample loss over the last 10% of steps; > {CONVERGED_RTOL:.0%}: "
                           "not converged"}


def seed_runs(p: Preset, out: Path, t: Tuning, which: dict | None = None) -> list[dict]:
    """The finished runs of a selected configuration (default: the normalizer's choice) on every seed."""
    run = which or (t.chosen.run if t.chosen else None)
    if run is None:
        return []
    return [r for r in (load_run(out, c) for c in seed_configs(p, run)) if r is not None]


def convergence(run: dict) -> float | None:
    """Relative fall of the validation(-sample) loss from 90% of the steps to the end (positive: still falling)."""
    evals = [e for e in run.get("evals", []) if e.get("loss") is not None]
    if run.get("diverged") or len(evals) < 2:
        return None
    last = evals[-1]
    earlier = [e for e in evals[:-1] if e["step"] <= 0.9 * last["step"]]
    if not earlier:
        return None
    return (earlier[-1]["loss"] - last["loss"]) / last["loss"]


def _compared(task: dict, run: dict) -> tuple[float | None, np.ndarray | None]:
    """The compared test quantity of a run and its per-example values (None where not stored)."""
    ex = run.get("test_examples")
    if task["kind"] == "lm":
        return run.get("test_loss"), None if not ex else np.asarray(ex["loss"], dtype=np.float64)
    # correctness as float (uint8 differences would wrap around)
    return run.get("value"), None if not ex else (np.frombuffer(ex["correct"].encode(), dtype=np.uint8) - ord("0")).astype(np.float64)


def _comparison(task: dict, arms: dict[str, list[dict]], reference: str) -> dict[str, dict]:
    """stats.compare over ``arms`` (name → seed runs), Holm across them; keyed by arm."""
    values, per_doc = {}, {}
    for name, runs in arms.items():
        got = {r["seed"]: _compared(task, r) for r in runs if not r["diverged"]}
        values[name] = {s: v for s, (v, _) in got.items() if v is not None}
        per_doc[name] = {s: d for s, (_, d) in got.items() if d is not None}
    complete = all(len(per_doc[n]) == len(values[n]) for n in values)
    lower = task["kind"] == "lm" or metric_of(task) in LOWER_IS_BETTER
    rows = stats.compare(values, reference, lower, ALPHA, per_document=per_doc if complete else None)
    return {r["arm"]: r for r in rows}


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _describe(runs: list[dict]) -> dict:
    """Test metric mean ± std, validation loss and convergence over a set of seed runs."""
    vals = [r["value"] for r in runs if r["value"] is not None]
    conv = [c for c in (convergence(r) for r in runs) if c is not None]
    mean, std = _stats(vals)
    conv_mean = _stats(conv)[0]
    info = [r["information"] for r in runs if r.get("information")]
    plane = None if not info else {"seeds": len(info), **{f"{k}_layer_mean": float(np.mean([np.mean([v[k] for v in i.values()]) for i in info]))
                                                          for k in ("I_XT", "I_TY")}}
    return {"mean": mean, "std": std, "n": len(vals), "diverged": sum(r["diverged"] for r in runs), "information": plane,
            "val_loss_mean": _stats([r["val_loss"] for r in runs if r.get("val_loss") is not None])[0],
            "test_loss_mean": _stats([r["test_loss"] for r in runs if r.get("test_loss") is not None])[0],
            "val_loss_fall_last10": conv_mean, "converged": None if conv_mean is None else conv_mean <= CONVERGED_RTOL}


_COMPARISON_KEYS = ("delta", "delta_std", "interval", "interval_kind", "p", "p_holm", "test", "verdict")


def _edge_rows(p: Preset, out: Path, task: dict, tunings: dict[str, Tuning]) -> dict[tuple, dict]:
    """The finished edge probes of a task, keyed by the (normalizer, λ, lr, wd) they probe."""
    rows = {}
    for t in tunings.values():
        if not (p.probe_edges and t.complete):
            continue
        for sel in edges.selections(t.chosen, t.per_lambda):
            cfg = edges.probe_config(sel, task["lrs"])
            rec = cfg and load_run(out, cfg)
            if rec:
                row = edges.probe_row(task["name"], sel, rec)
                rows[(row["normalizer"], row["lam"], row["lr"], row["wd"])] = row
    return rows


def _edge_note(probe: dict | None) -> str:
    """How the tables mark an lr on the grid's edge: what its probe said, if one ran."""
    return " (edge)" if probe is None else " (edge, bracketed)" if probe["bracketed"] else " (edge, optimum beyond)"


def _task_summary(p: Preset, out: Path, task: dict) -> dict[str, list]:
    """One task's share of every list :func:`summarize` returns."""
    tunings = {n: tuning(p, out, task, n) for n in p.normalizers}
    arms = {n: seed_runs(p, out, t) for n, t in tunings.items() if t.complete}
    comp = _comparison(task, arms, "baseline") if "baseline" in arms else {}
    probes = _edge_rows(p, out, task, tunings)
    rows, warnings, runs_out = [], [], []
    for norm, runs in arms.items():
        t = tunings[norm]
        runs_out += [{k: r.get(k) for k in RUN_FIELDS} for r in runs]
        tried = sum(r is not None for r in t.grid_runs + t.extra_runs)
        row = {"normalizer": norm, "task": task["name"], "metric": metric_of(task), **_describe(runs),
               "selection": t.chosen.summary(), "lr": t.chosen.run["lr"], "wd": t.chosen.run["wd"], "lam": t.chosen.run["lam"],
               "budget": t.budget, "tuned": tried, "s_per_step": float(np.mean([r["s_per_step"] for r in runs])),
               "activation_mib": runs[0]["activation_mib"], "peak_mem_mib": runs[0]["peak_mem_mib"],
               "mean_lambda_end": _stats([r["mean_lambda"] for r in runs if r["mean_lambda"] is not None])[0]}
        if norm in comp:
            row.update({k: comp[norm][k] for k in _COMPARISON_KEYS})
        row["edge_probe"] = probes.get((norm, row["lam"], row["lr"], row["wd"]))
        warnings += _warnings(task["name"], norm, row, t)
        rows.append(row)
    for norm, t in tunings.items():
        if not t.complete:
            warnings.append(f"{task['name']} {norm}: tuning incomplete ({sum(r is not None for r in t.grid_runs + t.extra_runs)} "
                            f"of {t.budget} configurations)")
    curve = _lambda_curve(p, out, task, tunings.get(LAMBDA_CURVE_NORMALIZER), arms.get("baseline"))
    for pt in curve["points"]:
        pt["edge_probe"] = probes.get((LAMBDA_CURVE_NORMALIZER, pt["lam"], pt["lr"], pt["wd"]))
    warnings += [f"{task['name']} {LAMBDA_CURVE_NORMALIZER} λ={pt['lam']:g}: selected lr {pt['lr']:g} is at the edge of the grid"
                 for pt in curve["points"] if pt["lr_on_edge"] and pt["edge_probe"] is None]
    warnings += [edges.describe(r) for r in probes.values()]
    return {"summary": rows, "lambda_curve": [curve], "warnings": warnings, "runs": runs_out, "edge_probes": list(probes.values()),
            "extended": _extended_comparison(p, out, task, tunings),
            "information_plane": _information_comparison(p, out, task, tunings, arms)}


def _arm_selections(tunings: dict[str, Tuning]) -> list[tuple[str, Tuning, Selection]]:
    """The arms the secondary and information-plane tables compare, named: every complete normalizer's choice,
    and for the λ-curve normalizer each λ point instead (its choice is one of them)."""
    out = []
    for norm, t in tunings.items():
        if not t.complete:
            continue
        out += ([(f"{norm} λ={lam:g}", t, s) for lam, s in sorted(t.per_lambda.items())] if norm == LAMBDA_CURVE_NORMALIZER
                else [(norm, t, t.chosen)])
    return out


def _extended_comparison(p: Preset, out: Path, task: dict, tunings: dict[str, Tuning]) -> list[dict]:
    """The secondary analysis (edges.py): every arm at its extended choice — its edge probe where the probe won —
    against the baseline at its own, Holm across the arms; empty when no probe of the task won."""
    if not p.probe_edges or not all(t.complete for t in tunings.values()):
        return []
    arms, moved = {}, {}
    for name, t, sel in _arm_selections(tunings):
        run = extended_choice(p, out, task, sel)
        arms[name], moved[name] = seed_runs(p, out, t, run), (run is not sel.run, run["config"]["lr"])
    if not any(m for m, _ in moved.values()) or "baseline" not in arms:
        return []
    comp = _comparison(task, arms, "baseline")
    return [{"task": task["name"], "arm": name, "lr": moved[name][1], "extended": moved[name][0],
             **{k: v for k, v in _describe(runs).items() if k in ("mean", "std", "n", "test_loss_mean")},
             **({k: comp[name][k] for k in _COMPARISON_KEYS} if name in comp else {})} for name, runs in arms.items()]


PLANE = {"I_XT": "I(X;T)", "I_TY": "I(T;Y)"}


def _plane_mean(run: dict, key: str) -> float | None:
    info = run.get("information")
    return float(np.mean([v[key] for v in info.values()])) if info else None


def _information_comparison(p: Preset, out: Path, task: dict, tunings: dict[str, Tuning], arms: dict[str, list[dict]]) -> list[dict]:
    """The trained models' information planes against the baseline's, paired by seed: the layer-mean I(X;T) and
    I(T;Y) of each arm (every normalizer's choice; the λ-curve normalizer's λ points instead of its choice, which
    is one of them), paired t over seeds, Holm across the arms of each quantity.  The estimate is of one fixed
    validation batch: the seed-to-seed spread holds the models' and the estimator's variation on it."""
    if "baseline" not in arms or not any(_plane_mean(r, "I_XT") is not None for r in arms["baseline"]):
        return []
    cmp_arms = {name: arms[name] if name in arms else seed_runs(p, out, t, sel.run) for name, t, sel in _arm_selections(tunings)}
    rows = []
    for key, name in PLANE.items():
        values = {a: {r["seed"]: v for r in runs if (v := _plane_mean(r, key)) is not None} for a, runs in cmp_arms.items()}
        for r in stats.compare(values, "baseline", lower_is_better=False, alpha=ALPHA):
            higher = {stats.BETTER: "higher", stats.WORSE: "lower"}.get(r["verdict"], r["verdict"])
            paired = sorted(set(values[r["arm"]]) & set(values["baseline"]))  # both means over the paired seeds
            rows.append({"task": task["name"], "arm": r["arm"], "quantity": name, "n": r["n"],
                         "baseline": float(np.mean([values["baseline"][s] for s in paired])) if paired else None,
                         "mean": float(np.mean([values[r["arm"]][s] for s in paired])) if paired else None,
                         **{k: r[k] for k in ("delta", "interval", "p", "p_holm")}, "verdict": higher})
    return rows


def _warnings(task: str, norm: str, row: dict, t: Tuning) -> list[str]:
    out = []
    if row["selection"]["lr_on_edge"] and row["edge_probe"] is None:  # a probe's answer is its own warning
        out.append(f"{task} {norm}: selected lr {row['lr']:g} is at the edge of the learning rates tried "
                   "(the optimum may lie outside the grid)")
    if row["converged"] is False:
        out.append(f"{task} {norm}: not converged (validation loss fell {row['val_loss_fall_last10']:.1%} over the last 10% of steps)")
    if row["selection"]["tied_with"]:
        out.append(f"{task} {norm}: validation-loss tie with {row['selection']['tied_with']}, broken by the documented rule")
    if row["tuned"] != row["budget"]:
        out.append(f"{task} {norm}: {row['tuned']} tuning runs for a budget of {row['budget']}")
    return out


def summarize(p: Preset, out: Path) -> dict:
    parts: dict[str, list] = {k: [] for k in ("runs", "summary", "lambda_curve", "edge_probes", "extended", "information_plane", "warnings")}
    for task in p.tasks:
        for k, v in _task_summary(p, out, task).items():
            parts[k] += v
    parts["lambda_curve"] = [c for c in parts["lambda_curve"] if c["points"]]
    return {"preset": p.name, "protocol": protocol(p), **parts}


def _lambda_curve(p: Preset, out: Path, task: dict, t: Tuning | None, base: list[dict] | None) -> dict:
    """Each λ point at its own selected lr on every seed, compared with the baseline (Holm across the λ points)."""
    curve = {"task": task["name"], "normalizer": LAMBDA_CURVE_NORMALIZER, "metric": metric_of(task), "points": []}
    if t is None or not t.complete:
        return curve
    arms = {f"lam={lam:g}": seed_runs(p, out, t, t.per_lambda[lam].run) for lam in lambda_points(p)}
    comp = _comparison(task, {**arms, "baseline": base}, "baseline") if base else {}
    for lam in sorted(lambda_points(p)):
        runs, sel = arms[f"lam={lam:g}"], t.per_lambda[lam]
        if not runs:
            continue
        pt = {"lam": lam, "lr": sel.run["lr"], "wd": sel.run["wd"], "lr_on_edge": sel.on_edge, "candidates": sel.candidates,
              **_describe(runs)}
        pt.update({k: comp[f"lam={lam:g}"][k] for k in _COMPARISON_KEYS} if f"lam={lam:g}" in comp else {})
        curve["points"].append(pt)
    return curve


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _delta(r: dict, lm: bool) -> str:
    if r.get("delta") is None:
        return ""
    scale = 1.0 if lm else 100.0  # accuracy in points
    iv = r.get("interval")
    iv_s = "" if iv is None else f" [{iv[0] * scale:+.3g}, {iv[1] * scale:+.3g}]"
    return f"{r['delta'] * scale:+.3g}{iv_s}"


def _conv(r: dict) -> str:
    if r.get("val_loss_fall_last10") is None:
        return "–"
    return f"{r['val_loss_fall_last10']:+.1%}" + ("" if r["converged"] else " **not converged**")


def results_markdown(p: Preset, result: dict, command: str) -> str:
    proto = result["protocol"]
    lines = [f"# ibnorm study — preset `{p.name}`", "", f"Command: `{command}`", "", p.description, "",
             f"Seeds {proto['seeds'][0]}–{proto['seeds'][-1]} (tuning seed {proto['tuning_seed']}). Selection: {proto['selection']}. "
             f"Budget: {proto['budget']}. Compared: {proto['compared']}. Statistics: {proto['statistics']}. "
             f"Convergence: {proto['convergence']}.", ""]
    if p.extra.get("omitted_tasks"):
        lines += [f"Tasks in this report: {', '.join(t['name'] for t in p.tasks)}. Not in it (run with `--task`): "
                  f"{', '.join(p.extra['omitted_tasks'])}.", ""]
    for task in p.tasks:
        rows = [r for r in result["summary"] if r["task"] == task["name"]]
        if not rows:
            continue
        lm = task["kind"] == "lm"
        dname = "Δ test loss, nats [95% interval]" if lm else "Δ accuracy, points [95% interval]"
        lines += [f"## {task['name']} (test {rows[0]['metric']}, {'lower' if lm else 'higher'} is better)", "",
                  f"| normalizer | test mean ± std | n | lr | wd | λ | budget | {dname} | p | p Holm | verdict | "
                  "val-loss fall, last 10% | λ end | s/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            edge = _edge_note(r["edge_probe"]) if r["selection"]["lr_on_edge"] else ""
            lines.append(f"| {r['normalizer']} | {_fmt(r['mean'])} ± {_fmt(r['std'], 2)} | {r['n']} | {r['lr']:g}{edge} | {r['wd']:g} | "
                         f"{r['lam']:g} | {r['tuned']}/{r['budget']} | {_delta(r, lm)} | {_fmt(r.get('p'), 2)} | {_fmt(r.get('p_holm'), 2)} | "
                         f"{r.get('verdict', 'reference')} | {_conv(r)} | {_fmt(r['mean_lambda_end'], 3)} | {r['s_per_step']:.4f} |")
        lines.append("")
    for c in result["lambda_curve"]:
        lm = next(t for t in p.tasks if t["name"] == c["task"])["kind"] == "lm"
        lines += [f"### λ curve, {c['task']} ({c['normalizer']}, each λ at its own lr; Holm across the λ points)", "",
                  "| λ | lr | test mean ± std | n | Δ vs baseline [95% interval] | p | p Holm | verdict | val loss | val-loss fall |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for pt in c["points"]:
            lines.append(f"| {pt['lam']:g} | {pt['lr']:g}{_edge_note(pt['edge_probe']) if pt['lr_on_edge'] else ''} | {_fmt(pt['mean'])} ± {_fmt(pt['std'], 2)} | "
                         f"{pt['n']} | {_delta(pt, lm)} | {_fmt(pt.get('p'), 2)} | {_fmt(pt.get('p_holm'), 2)} | {pt.get('verdict', '–')} | "
                         f"{_fmt(pt['val_loss_mean'])} | {_conv(pt)} |")
        lines.append("")
    lines += _edge_markdown(result.get("edge_probes", []))
    lines += _extended_markdown(p, result.get("extended", []))
    lines += _plane_markdown(result.get("information_plane", []))
    if result["warnings"]:
        lines += ["## Warnings", ""] + [f"* {w}" for w in result["warnings"]] + [""]
    return "\n".join(lines)


def _plane_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## Information plane of the trained models, paired by seed", "",
             "Layer-mean I(X;T) (T read along X's axes, noise σ 0.5) and I(T;Y), nats, of each trained model on one fixed "
             "validation batch (ibnorm.mi.information_snapshot); each arm against the baseline, paired t over seeds, Holm "
             "across the arms of each quantity. docs/information.md says what these quantities can and cannot show.", "",
             "| task | quantity | arm | n | baseline | arm | Δ [95% interval] | p | p Holm | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        iv = "" if r["interval"] is None else f" [{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}]"
        lines.append(f"| {r['task']} | {r['quantity']} | {r['arm']} | {r['n']} | {_fmt(r['baseline'])} | {_fmt(r['mean'])} | "
                     f"{r['delta']:+.3f}{iv} | {_fmt(r['p'], 2)} | {_fmt(r['p_holm'], 2)} | {r['verdict']} |")
    return lines + [""]


def _extended_markdown(p: Preset, rows: list[dict]) -> list[str]:
    lines = []
    for task in p.tasks:
        mine = [r for r in rows if r["task"] == task["name"]]
        if not mine:
            continue
        lm = task["kind"] == "lm"
        lines += [f"### Secondary: {task['name']} at the extended choice (a winning edge probe replaces its selection, "
                  "run on every seed; Holm across the arms)", "",
                  "| arm | lr | test mean ± std | n | Δ vs baseline [95% interval] | p | p Holm | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['arm']} | {r['lr']:g}{' (probe)' if r['extended'] else ''} | {_fmt(r['mean'])} ± {_fmt(r['std'], 2)} | {r['n']} | "
                  f"{_delta(r, lm)} | {_fmt(r.get('p'), 2)} | {_fmt(r.get('p_holm'), 2)} | {r.get('verdict', 'reference')} |" for r in mine]
        lines.append("")
    return lines


def _edge_markdown(probes: list[dict]) -> list[str]:
    if not probes:
        return []
    lines = ["## One grid step beyond the edge (tuning seed; a diagnostic, not a candidate)", "",
             "Each selection on the grid's edge, run once more on the tuning seed one grid step beyond it. A higher "
             "validation loss there means the grid brackets the optimum; a lower one that the optimum lies beyond it.", "",
             "| task | normalizer | λ | wd | lr chosen | val loss | lr beyond | val loss beyond | optimum |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in probes:
        beyond = "diverged" if r["probe_diverged"] or r["probe_val_loss"] is None else f"{r['probe_val_loss']:.4g}"
        lines.append(f"| {r['task']} | {r['normalizer']} | {r['lam']:g} | {r['wd']:g} | {r['lr']:g} | {r['val_loss']:.4g} | "
                     f"{r['probe_lr']:g} | {beyond} | {'inside the grid' if r['bracketed'] else '**beyond the grid**'} |")
    return lines + [""]


def _band(runs: list[dict], key: str, smooth: int) -> tuple[list[float], list[float], list[float], list[float]]:
    if key == "losses":
        seqs = [np.convolve(r["losses"], np.ones(smooth) / smooth, mode="valid") for r in runs if not r["diverged"]]
        xs = list(range(smooth, smooth + min((len(s) for s in seqs), default=0)))
    else:
        seqs = [np.array([e[key] for e in r["evals"]]) for r in runs if not r["diverged"]]
        xs = [e["step"] for e in runs[0]["evals"]] if runs else []
    if not seqs or not xs:
        return [], [], [], []
    m = np.stack([s[: len(xs)] for s in seqs])
    mean, std = m.mean(0), m.std(0)
    return xs, mean.tolist(), (mean - std).tolist(), (mean + std).tolist()


def write_charts(p: Preset, out: Path, result: dict) -> list[str]:
    written = []
    for task in p.tasks:
        metric = metric_of(task)
        smooth = max(1, task["steps"] // 25)
        for key, ylabel, fname in (("losses", "training loss", "loss"), (metric, f"validation {metric}", "val")):
            series = []
            for norm in p.normalizers:
                runs = seed_runs(p, out, tuning(p, out, task, norm))
                xs, mean, lo, hi = _band(runs, key, smooth)
                if xs:
                    series.append(Series(f"{norm} (n={len(runs)})", xs, mean, lo, hi))
            if series:
                path = out / f"{fname}_{task['name']}.png"
                path.write_bytes(render(Chart(f"{task['name']}: {ylabel}, mean ± std over seeds", "step", ylabel, series)))
                written.append(path.name)
        written += _lambda_chart(out, task, result)
    return written


def _lambda_chart(out: Path, task: dict, result: dict) -> list[str]:
    curve = next((c for c in result["lambda_curve"] if c["task"] == task["name"]), None)
    if not curve:
        return []
    pts = [q for q in curve["points"] if q["mean"] is not None]
    if not pts:
        return []
    s = Series(f"{curve['normalizer']} (test, own lr per λ)", [q["lam"] for q in pts], [q["mean"] for q in pts],
               [q["mean"] - (q["std"] or 0.0) for q in pts], [q["mean"] + (q["std"] or 0.0) for q in pts])
    base = next((r for r in result["summary"] if r["task"] == task["name"] and r["normalizer"] == "baseline"), None)
    hl = [(f"baseline {base['mean']:.4g}", base["mean"])] if base and base["mean"] is not None else []
    path = out / f"lambda_{task['name']}.png"
    path.write_bytes(render(Chart(f"{task['name']}: test {curve['metric']} vs λ (mean ± std)", "λ", curve["metric"], [s],
                                  logx=True, hlines=hl)))
    return [path.name]


def write_report(p: Preset, out: Path, command: str) -> dict:
    result = summarize(p, out)
    (out / "results.json").write_text(json.dumps(json_safe(result), indent=1))
    (out / "results.md").write_text(results_markdown(p, result, command))
    result["charts"] = write_charts(p, out, result)
    return result


def json_safe(obj):
    """JSON without NaN (not valid JSON): non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
