"""Aggregate a study directory: best config per normalizer, mean ± std over seeds, paired tests
against the baseline, the λ curve, results.md / results.json and PNG charts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..charts import Chart, Series, render
from .presets import Preset
from .runner import LAMBDA_CURVE_NORMALIZER, load_run, make_config, select_best
from .train import LOWER_IS_BETTER, metric_of

RUN_FIELDS = ("task", "normalizer", "seed", "metric", "value", "val", "lam", "lr", "wd", "diverged", "mean_lambda",
              "s_per_step", "activation_mib", "peak_mem_mib", "params")


def _selected(p: Preset, out: Path, task: dict, norm: str) -> tuple[list[dict], bool]:
    """Runs of the best grid point (all seeds) and whether the grid search is complete."""
    grid = [load_run(out, make_config(p, task, norm, lr, wd, 0)) for lr in task["lrs"] for wd in task["wds"]]
    finished = [r for r in grid if r is not None]
    best = select_best(finished)
    if best is None:
        return [], False
    runs = [best] + [load_run(out, make_config(p, task, norm, best["lr"], best["wd"], s)) for s in range(1, p.seeds)]
    return [r for r in runs if r is not None], len(finished) == len(grid)


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _paired(runs: list[dict], base: list[dict], lower: bool) -> dict:
    """Paired comparison by seed (same initial weights and data order): diff = normalizer − baseline."""
    b = {r["seed"]: r["value"] for r in base if r["value"] is not None}
    pairs = [(r["value"], b[r["seed"]]) for r in runs if r["value"] is not None and r["seed"] in b]
    if len(pairs) < 2:
        return {"pairs": len(pairs), "diff": None, "diff_std": None, "p_value": None, "verdict": "too few paired seeds"}
    from scipy.stats import ttest_rel

    d = np.array([a - c for a, c in pairs])
    p_value = float(ttest_rel([a for a, _ in pairs], [c for _, c in pairs]).pvalue) if d.std() > 0 else (1.0 if d.mean() == 0 else 0.0)
    better = d.mean() < 0 if lower else d.mean() > 0
    verdict = "no significant difference" if not (p_value < 0.05) else ("better" if better else "worse")
    return {"pairs": len(pairs), "diff": float(d.mean()), "diff_std": float(d.std(ddof=1)), "p_value": p_value, "verdict": verdict}


def summarize(p: Preset, out: Path) -> dict:
    runs_out, summary, curves = [], [], []
    for task in p.tasks:
        metric, lower = metric_of(task), metric_of(task) in LOWER_IS_BETTER
        selected = {n: _selected(p, out, task, n) for n in p.normalizers}
        base = selected.get("baseline", ([], False))[0]
        for norm, (runs, complete) in selected.items():
            if not runs:
                continue
            runs_out += [{k: r.get(k) for k in RUN_FIELDS} for r in runs]
            vals = [r["value"] for r in runs if r["value"] is not None]
            mean, std = _stats(vals)
            row = {"normalizer": norm, "task": task["name"], "metric": metric, "mean": mean, "std": std, "n": len(vals),
                   "diverged": sum(r["diverged"] for r in runs), "lr": runs[0]["lr"], "wd": runs[0]["wd"], "lam": runs[0]["lam"],
                   "val_mean": _stats([r["val"] for r in runs if r["val"] is not None])[0], "grid_complete": complete,
                   "s_per_step": float(np.mean([r["s_per_step"] for r in runs])),
                   "activation_mib": runs[0]["activation_mib"], "peak_mem_mib": runs[0]["peak_mem_mib"],
                   "mean_lambda_end": _stats([r["mean_lambda"] for r in runs if r["mean_lambda"] is not None])[0]}
            if norm != "baseline":
                row.update(_paired(runs, base, lower))
            summary.append(row)
        curves.append(_lambda_curve(p, out, task, selected.get(LAMBDA_CURVE_NORMALIZER, ([], False))[0], base))
    return {"preset": p.name, "runs": runs_out, "summary": summary, "lambda_curve": [c for c in curves if c["points"]]}


def _lambda_curve(p: Preset, out: Path, task: dict, chosen: list[dict], base: list[dict]) -> dict:
    points = []
    if chosen:
        lr, wd = chosen[0]["lr"], chosen[0]["wd"]
        for lam in sorted(set(p.lam_curve) | {p.lam}):
            recs = [load_run(out, make_config(p, task, LAMBDA_CURVE_NORMALIZER, lr, wd, s, lam)) for s in range(p.seeds)]
            recs = [r for r in recs if r is not None]
            vals = [r["value"] for r in recs if r["value"] is not None]
            if vals:
                mean, std = _stats(vals)
                paired = _paired(recs, base, metric_of(task) in LOWER_IS_BETTER)
                points.append({"lam": lam, "mean": mean, "std": std, "n": len(vals),
                               "val_mean": _stats([r["val"] for r in recs if r["val"] is not None])[0],
                               **{k: paired[k] for k in ("diff", "diff_std", "p_value", "verdict")}})
    return {"task": task["name"], "normalizer": LAMBDA_CURVE_NORMALIZER, "metric": metric_of(task), "points": points}


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def results_markdown(p: Preset, result: dict, command: str) -> str:
    lines = [f"# ibnorm study — preset `{p.name}`", "", f"Command: `{command}`", "", p.description, "",
             f"Seeds: {p.seeds}. Each normalizer: every (lr, wd) of its task's grid on seed 0, the best by validation "
             "metric then run on every seed; the table reports the **test** split at that setting (mean ± std over seeds). "
             "Paired: difference to the baseline by seed (same initial weights and batches), paired t-test.", ""]
    for task in p.tasks:
        rows = [r for r in result["summary"] if r["task"] == task["name"]]
        if not rows:
            continue
        lines += [f"## {task['name']} ({rows[0]['metric']}, {'lower' if rows[0]['metric'] in LOWER_IS_BETTER else 'higher'} is better)", "",
                  "| normalizer | test mean ± std | n | lr | wd | Δ vs baseline (± std) | p | verdict | val mean | λ end | s/step | act. MiB | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            flag = "" if r["grid_complete"] else " (grid incomplete)"
            diff = "" if r.get("diff") is None else f"{r['diff']:+.4g} ± {r['diff_std']:.2g}"
            lines.append(f"| {r['normalizer']}{flag} | {_fmt(r['mean'])} ± {_fmt(r['std'], 2)} | {r['n']} | {r['lr']:g} | {r['wd']:g} | "
                         f"{diff} | {_fmt(r.get('p_value'), 2)} | {r.get('verdict', 'reference')} | {_fmt(r['val_mean'])} | "
                         f"{_fmt(r['mean_lambda_end'], 3)} | {r['s_per_step']:.4f} | {r['activation_mib']:.1f} | {_fmt(r['peak_mem_mib'], 5)} |")
        lines.append("")
    for c in result["lambda_curve"]:
        lines += [f"### λ curve, {c['task']} ({c['normalizer']} at its selected lr/wd; Δ paired by seed with the baseline)", "",
                  "| λ | test mean ± std | n | Δ vs baseline (± std) | p | verdict | val mean |", "|---|---|---|---|---|---|---|"]
        for pt in c["points"]:
            diff = "" if pt.get("diff") is None else f"{pt['diff']:+.4g} ± {pt['diff_std']:.2g}"
            lines.append(f"| {pt['lam']:g} | {pt['mean']:.4g} ± {pt['std']:.2g} | {pt['n']} | {diff} | {_fmt(pt.get('p_value'), 2)} | "
                         f"{pt.get('verdict')} | {_fmt(pt.get('val_mean'))} |")
        lines.append("")
    return "\n".join(lines)


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
                runs, _ = _selected(p, out, task, norm)
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
    pts = curve["points"]
    s = Series(f"{curve['normalizer']} (test)", [q["lam"] for q in pts], [q["mean"] for q in pts],
               [q["mean"] - q["std"] for q in pts], [q["mean"] + q["std"] for q in pts])
    base = next((r for r in result["summary"] if r["task"] == task["name"] and r["normalizer"] == "baseline"), None)
    hl = [(f"baseline {base['mean']:.4g}", base["mean"])] if base and base["mean"] is not None else []
    path = out / f"lambda_{task['name']}.png"
    path.write_bytes(render(Chart(f"{task['name']}: test {curve['metric']} vs λ (mean ± std)", "λ", curve["metric"], [s],
                                  logx=True, hlines=hl)))
    return [path.name]


def write_report(p: Preset, out: Path, command: str) -> dict:
    result = summarize(p, out)
    (out / "results.json").write_text(json.dumps(_clean(result), indent=1))
    (out / "results.md").write_text(results_markdown(p, result, command))
    result["charts"] = write_charts(p, out, result)
    return result


def _clean(obj):
    """JSON without NaN (not valid JSON): non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj
