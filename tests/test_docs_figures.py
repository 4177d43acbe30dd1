"""Every figure docs/findings.md and docs/information.md quote is read back from the committed results file
it comes from: a re-run that changes a result fails here until the docs follow.

Each row: (doc, the exact text the doc quotes, the file, how the text is computed from the file).
Figures that trace to no committed file are not quoted by the docs (see the last test).
"""

from __future__ import annotations

import glob
import json
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FINDINGS, INFORMATION, README = "docs/findings.md", "docs/information.md", "README.md"
STUDY, MI = "benchmarks/results/study_cpu", "benchmarks/results/mi_smollm2"


@lru_cache(maxsize=None)
def _json(path: str):
    return json.loads((ROOT / path).read_text())


@lru_cache(maxsize=None)
def _doc(path: str) -> str:
    return (ROOT / path).read_text()


def _minus(s: str) -> str:
    return s.replace("-", "−")


def _row(task: str, norm: str) -> dict:
    return next(r for r in _json(f"{STUDY}/results.json")["summary"] if r["task"] == task and r["normalizer"] == norm)


def _holm(task: str, norm: str) -> float:
    return _json(f"{STUDY}/resummary.json")["tasks"][task][norm]["new_stats_old_choice"]["p_holm"]


def _lam_point(task: str, lam: float, key: str, source: str = "results") -> float:
    if source == "results":
        curve = next(c for c in _json(f"{STUDY}/results.json")["lambda_curve"] if c["task"] == task)
        return next(p for p in curve["points"] if p["lam"] == lam)[key]
    return next(p for p in _json(f"{STUDY}/resummary.json")["lambda_curves"][task] if p["lam"] == lam)[key]


def _run(path: str) -> dict:
    return _json(f"{STUDY}/runs/{path}")


def _ties() -> str:
    grid = [json.loads(Path(f).read_text()) for f in glob.glob(str(ROOT / STUDY / "runs/resnet-digits/ibnorm-t/lam0.3_*_s0.json"))]
    best = max(r["val"] for r in grid)
    return f"tied on {sum(r['val'] == best for r in grid)} of {len(grid)} grid points"


def _mi(name: str) -> tuple[list[dict], list[dict] | None]:
    d = _json(f"{MI}/{name}")
    return d["layers"], (d["compare"][0]["layers"] if d.get("compare") else None)


def _finetune_ppl() -> list[float]:
    """Held-out perplexity of the data-free λ = 0.3 SmolLM2 at the first and last evaluation of its fine-tune."""
    evals = [json.loads(line)["eval"] for line in (ROOT / MI / "finetune_metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    return [evals[0]["perplexity"], evals[-1]["perplexity"]]


def _mean(layers: list[dict], key: str) -> float:
    return float(np.mean([lay[key] for lay in layers]))


def _lam_range() -> str:
    vals = [_row(t, n)["mean_lambda_end"] for t in ("resnet-digits", "vit-digits", "llama-bytes")
            for n in ("ibnorm-s-learn", "ibnorm-l-learn", "ibnorm-t-learn")]
    return f"final means {min(vals):.2f}–{max(vals):.2f}"


def _beyond_2sigma(key: str) -> tuple[int, int]:
    src, cal = _mi("source_vs_calibrated.json")
    big = [c[key] - s[key] for s, c in zip(src, cal) if abs(c[key] - s[key]) > 2 * math.hypot(s[key + "_err"], c[key + "_err"])]
    return sum(d < 0 for d in big), sum(d > 0 for d in big)


def _conversion_row() -> re.Match:
    text = (ROOT / "benchmarks/results/smollm2_conversion.md").read_text()
    return re.search(r"\| 0\.001 \| 0\.01 \| 0\.240 \|[^|]*\|[^|]*\| (0\.\d+) \|[^|]*\| ([\d.]+) \| ([\d.]+) \| ([+\-][\d.]+%) \|", text)


def _bias(rho: float, est: str) -> str:
    row = next(r for r in _json("benchmarks/results/mi_estimator_bias/results.json")["rows"] if r["rho"] == rho)
    return f"{row[est]['ratio_mean']:.3f} ± {row[est]['ratio_std']:.3f}"


def _fall(task: str) -> str:
    return f"{_json(f'{STUDY}/resummary.json')['tasks'][task]['baseline']['val_loss_fall_last10']:.1%}"


def _seconds_per_step_ratio(task: str, base_dir: str = STUDY) -> str:
    return f"{_row(task, 'ibnorm-t')['s_per_step'] / _row(task, 'baseline')['s_per_step']:.1f}×"


def _gpu(norm: str, key: str) -> float:
    return next(r for r in _json("benchmarks/results/gpu_check/results.json")["summary"] if r["normalizer"] == norm)[key]


def _planned_runs(preset: str) -> int:
    """Runs the planner schedules for a preset (a simulated study, benchmarks/study_estimate.py)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from study_estimate import count_runs

    from ibnorm.study import get_preset

    return sum(count_runs(get_preset(preset)).values())


def _estimate() -> dict:
    return _json("benchmarks/results/study_confirm/estimate.json")


PRETRAINED = "benchmarks/results/study_pretrained_smollm2/results.json"


def _pretrained_row(train: str, arm: str) -> str:
    """A row of findings section 3's table, from the pretrained comparison's results file."""
    res = _json(PRETRAINED)
    s = next(r for r in res["summary"] if r["train"] == train and r["arm"] == arm)
    row = f"| {train} | {arm} | {s['lr']:g} | | {s['test']:.3f} ± {s['test_std']:.2g} |"
    if arm != "source":
        c = next(r for r in res["comparisons"] if r["train"] == train and r["arm"] == arm)
        row += _minus(f" {c['delta']:+.3f} | [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] | {c['p_holm']:.2g} | {c['verdict']} |")
    return row


def _pretrained_step0() -> str:
    s0 = {r["arm"]: r["test"] for r in _json(PRETRAINED)["summary"] if r["step"] == 0}
    return f"costs {s0['tanh'] - s0['source']:+.3f} nats on this text before any fine-tuning ({s0['source']:.3f} → {s0['tanh']:.3f}"


CONFIRM = "benchmarks/results/study_confirm"
CONFIRM_TASKS = {"resnet-digits": "ResNet, widths 16, 32", "resnet-digits-w2": "ResNet, widths 32, 64",
                 "llama-bytes": "LLaMA, width 128", "llama-bytes-w64": "LLaMA, width 64"}


def _confirm() -> dict:
    return _json(f"{CONFIRM}/results.json")


def _c_base(task: str) -> dict:
    return next(r for r in _confirm()["summary"] if r["task"] == task and r["normalizer"] == "baseline")


def _c_point(task: str, lam: float) -> dict:
    return next(pt for c in _confirm()["lambda_curve"] if c["task"] == task for pt in c["points"] if pt["lam"] == lam)


def _c_value(task: str, r: dict) -> str:
    """The compared test quantity: LLaMA test loss (nats/token), ResNet test accuracy (%)."""
    return f"{r['test_loss_mean']:.3f}" if task.startswith("llama") else f"{r['mean']:.2%}"


def _c_delta(task: str, r: dict) -> str:
    scale, digits = (1, 3) if task.startswith("llama") else (100, 2)  # nats; accuracy points
    lo, hi = (v * scale for v in r["interval"])
    return _minus(f"{r['delta'] * scale:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]")


def _confirm_row(task: str, lam: float) -> str:
    """A row of findings 1.3's table: the baseline against IBNorm-T at one λ (its own lr), Holm across the λ points."""
    b, pt = _c_base(task), _c_point(task, lam)
    return (f"| {CONFIRM_TASKS[task]} | {b['lr']:g} | {_c_value(task, b)} | {lam:g} | {pt['lr']:g} | {_c_value(task, pt)} | "
            f"{_c_delta(task, pt)} | {pt['p_holm']:.2g} | {pt['verdict']} |")


def _edge_row(r: dict) -> str:
    beyond = "diverged" if r["probe_val_loss"] is None else f"{r['probe_val_loss']:.4f}"
    return (f"| {CONFIRM_TASKS[r['task']]} | {'IBNorm-T λ ' + format(r['lam'], 'g') if r['normalizer'] == 'ibnorm-t' else 'baseline'} | "
            f"{r['lr']:g} → {r['probe_lr']:g} | {r['val_loss']:.4f} → {beyond} | {'inside the grid' if r['bracketed'] else '**beyond the grid**'} |")


def _plane_row(task: str, arm: str) -> str:
    rows = {r["quantity"]: r for r in _confirm()["information_plane"] if r["task"] == task and r["arm"] == arm}
    cells = [_minus(f"{rows[q]['baseline']:.3f} → {rows[q]['mean']:.3f}, Δ {rows[q]['delta']:+.3f} "
                    f"[{rows[q]['interval'][0]:+.3f}, {rows[q]['interval'][1]:+.3f}], p_Holm {rows[q]['p_holm']:.2g}")
             for q in ("I(X;T)", "I(T;Y)")]
    return f"| {CONFIRM_TASKS[task]} | {arm.replace('ibnorm-t', 'IBNorm-T')} | {rows['I(X;T)']['n']} | {cells[0]} | {cells[1]} |"


def _ext_row(task: str, arm: str) -> str:
    """A row of findings 1.3's secondary table: an arm at its extended choice against the baseline at its own."""
    r = next(x for x in _confirm()["extended"] if x["task"] == task and x["arm"] == arm)
    value = _c_value(task, {**r, "test_loss_mean": r.get("test_loss_mean")})
    if arm == "baseline":
        return f"| {CONFIRM_TASKS[task]} | baseline | {r['lr']:g} | {value} | | | |"
    return (f"| {CONFIRM_TASKS[task]} | IBNorm-T λ {arm.split('=')[1]} | {r['lr']:g}{' (probe)' if r['extended'] else ''} | {value} | "
            f"{_c_delta(task, r)} | {r['p_holm']:.2g} | {r['verdict']} |")


def _ext(lam: str) -> dict:
    return next(x for x in _confirm()["extended"] if x["task"] == "llama-bytes-w64" and x["arm"] == f"ibnorm-t λ={lam}")


def _holm_all8() -> str:
    """Holm across every comparison of the four λ-curve tables: the two LLaMA λ = 1 rows' adjusted p."""
    from ibnorm.study.stats import holm

    pts = [(c["task"], pt) for c in _confirm()["lambda_curve"] for pt in c["points"]]
    adj = dict(zip([(t, pt["lam"]) for t, pt in pts], holm([pt["p"] for _, pt in pts])))
    return f"(p {adj[('llama-bytes', 1.0)]:.2g} and {adj[('llama-bytes-w64', 1.0)]:.2g})"


def _c_all(prefix: str) -> list[dict]:
    """Baselines and λ points of the confirm tasks whose name starts with ``prefix``."""
    return ([r for r in _confirm()["summary"] if r["task"].startswith(prefix) and r["normalizer"] == "baseline"]
            + [pt for c in _confirm()["lambda_curve"] if c["task"].startswith(prefix) for pt in c["points"]])


def _c_params(task: str) -> int:
    return next(r["params"] for r in _confirm()["runs"] if r["task"] == task)


def _confirm_core_hours() -> str:
    runs = [json.loads(Path(f).read_text()) for f in glob.glob(str(ROOT / CONFIRM / "runs/*/*/*.json"))]
    planned, probes = _estimate()["runs"], len(_confirm()["edge_probes"])
    return (f"{len(runs)} runs (the {planned} planned, {probes} edge probes and {len(runs) - planned - probes} seeds of the "
            f"winning probes) took {sum(r['s_per_step'] * len(r['losses']) for r in runs) / 3600:.1f} single-core hours")


FIGURES = [
    # section 3: the pretrained comparison (study_pretrained_smollm2)
    (FINDINGS, "| norms | source | 0.003 | | 4.276 ± 0.041 |", lambda: _pretrained_row("norms", "source")),
    (FINDINGS, "| norms | tanh | 0.003 | | 4.288 ± 0.035 | +0.012 | [−0.014, +0.038] | 0.12 | no detectable difference |", lambda: _pretrained_row("norms", "tanh")),
    (FINDINGS, "| lora | source | 0.003 | | 3.981 ± 0.12 |", lambda: _pretrained_row("lora", "source")),
    (FINDINGS, "| lora | tanh | 0.003 | | 4.024 ± 0.11 | +0.042 | [+0.015, +0.070] | 0.0036 | worse |", lambda: _pretrained_row("lora", "tanh")),
    (FINDINGS, "costs +0.032 nats on this text before any fine-tuning (4.514 → 4.546", _pretrained_step0),
    # section 1.1: the study as first reported (results.json)
    (FINDINGS, "IBNorm-T Δ −1.20 points (p 0.006)", lambda: "IBNorm-T Δ {} points (p {:.1g})".format(_minus(f"{_row('resnet-digits', 'ibnorm-t')['diff'] * 100:.2f}"), _row("resnet-digits", "ibnorm-t")["p_value"])),
    (FINDINGS, "-L (p 0.02), learnable -L (p 0.01), learnable -T (p 0.04)", lambda: f"-L (p {_row('resnet-digits', 'ibnorm-l')['p_value']:.1g}), learnable -L (p {_row('resnet-digits', 'ibnorm-l-learn')['p_value']:.1g}), learnable -T (p {_row('resnet-digits', 'ibnorm-t-learn')['p_value']:.1g})"),
    (FINDINGS, "every p ≥ 0.06", lambda: f"every p ≥ {min(_row('vit-digits', n)['p_value'] for n in ('ibnorm-s', 'ibnorm-l', 'ibnorm-t', 'ibnorm-s-learn', 'ibnorm-l-learn', 'ibnorm-t-learn')):.1g}"),
    (FINDINGS, "-S (p 0.04) and learnable -T (p 0.05)", lambda: f"-S (p {_row('llama-bytes', 'ibnorm-s')['p_value']:.1g}) and learnable -T (p {_row('llama-bytes', 'ibnorm-t-learn')['p_value']:.1g})"),
    (FINDINGS, "better, −0.21 perplexity (p 0.03)", lambda: "better, {} perplexity (p {:.1g})".format(_minus(f"{_lam_point('llama-bytes', 1.0, 'diff'):.2f}"), _lam_point("llama-bytes", 1.0, "p_value"))),
    (FINDINGS, "ResNet p 0.01, ViT p 0.001, LLaMA did not train: perplexity 24.35", lambda: f"ResNet p {_row('resnet-digits', 'dyt')['p_value']:.1g}, ViT p {_row('vit-digits', 'dyt')['p_value']:.1g}, LLaMA did not train: perplexity {_row('llama-bytes', 'dyt')['mean']:.2f}"),
    (FINDINGS, "final means 0.19–0.33", _lam_range),
    # section 1.2: the artefacts, read from the run files
    (FINDINGS, "tied on 5 of 6 grid points", _ties),
    (FINDINGS, "BatchNorm at lr 1e-3 (seed 0) scores 98.33%", lambda: f"BatchNorm at lr 1e-3 (seed 0) scores {_run('resnet-digits/baseline/lam0_lr0.001_wd0.01_s0.json')['value']:.2%}"),
    (FINDINGS, "IBNorm-T's own figure", lambda: "IBNorm-T's own figure" if _run("resnet-digits/ibnorm-t/lam0.3_lr0.001_wd0.01_s0.json")["value"] == _run("resnet-digits/baseline/lam0_lr0.001_wd0.01_s0.json")["value"] else "differs"),
    (FINDINGS, "it is 0.28 points (one image) below BatchNorm", lambda: f"it is {-_json(f'{STUDY}/resummary.json')['tasks']['resnet-digits']['ibnorm-t']['seed0_delta_at_new_choice'] * 100:.2f} points (one image) below BatchNorm"),
    (FINDINGS, "Selection on validation *loss* would have given IBNorm-T lr 1e-2", lambda: f"Selection on validation *loss* would have given IBNorm-T lr {_json(f'{STUDY}/resummary.json')['tasks']['resnet-digits']['ibnorm-t']['new_choice']['lr']:.0e}".replace("e-02", "e-2")),
    (FINDINGS, "still fell 2.6% over the last 10% of steps", lambda: f"still fell {_fall('llama-bytes')} over the last 10% of steps"),
    (FINDINGS, "(the ViT's 15.3%)", lambda: f"(the ViT's {_fall('vit-digits')})"),
    # section 1.2: Holm-corrected (resummary.json)
    (FINDINGS, "worse (p_Holm 0.041)", lambda: f"worse (p_Holm {_holm('resnet-digits', 'ibnorm-t'):.2g})"),
    (FINDINGS, "no detectable difference (p_Holm 0.061, 0.059, 0.11)", lambda: "no detectable difference (p_Holm " + ", ".join(f"{_holm('resnet-digits', n):.2g}" for n in ("ibnorm-l", "ibnorm-l-learn", "ibnorm-t-learn")) + ")"),
    (FINDINGS, "no detectable difference (p_Holm 0.25, 0.25)", lambda: f"no detectable difference (p_Holm {_holm('llama-bytes', 'ibnorm-s'):.2g}, {_holm('llama-bytes', 'ibnorm-t-learn'):.2g})"),
    (FINDINGS, "no detectable difference (p_Holm 0.12)", lambda: f"no detectable difference (p_Holm {_lam_point('llama-bytes', 1.0, 'p_holm', 'resummary'):.2g})"),
    (FINDINGS, "worse on ViT (p_Holm 0.0091) and LLaMA (p_Holm 0.00096); ResNet no detectable difference (p_Holm 0.059)", lambda: f"worse on ViT (p_Holm {_holm('vit-digits', 'dyt'):.2g}) and LLaMA (p_Holm {_holm('llama-bytes', 'dyt'):.2g}); ResNet no detectable difference (p_Holm {_holm('resnet-digits', 'dyt'):.2g})"),
    # cost
    (FINDINGS, "took 4.2× the BatchNorm CNN's time and 1.5× the LLaMA's", lambda: f"took {_seconds_per_step_ratio('resnet-digits')} the BatchNorm CNN's time and {_seconds_per_step_ratio('llama-bytes')} the LLaMA's"),
    (FINDINGS, "58.4 vs 41.1 ms per step", lambda: f"{_gpu('ibnorm-t', 's_per_step') * 1000:.1f} vs {_gpu('baseline', 's_per_step') * 1000:.1f} ms per step"),
    (FINDINGS, "(4177 vs 4722 MiB)", lambda: f"({_gpu('ibnorm-t', 'peak_mem_mib'):.0f} vs {_gpu('baseline', 'peak_mem_mib'):.0f} MiB)"),
    (INFORMATION, "| 696 runs under the corrected protocol", lambda: f"| {_planned_runs('cpu')} runs under the corrected protocol"),
    (INFORMATION, "212 runs took 137 single-core minutes", lambda: "{} runs took {:.0f} single-core minutes".format(
        len(glob.glob(str(ROOT / STUDY / "runs/*/*/*.json"))),
        sum(json.loads(Path(f).read_text())["s_per_step"] * len(json.loads(Path(f).read_text())["losses"]) for f in glob.glob(str(ROOT / STUDY / "runs/*/*/*.json"))) / 60)),
    # section 1.3: the confirm preset (study_confirm/results.json)
    (FINDINGS, '| ResNet, widths 16, 32 | 0.03 | 99.33% | 0.3 | 0.03 | 99.36% | +0.03 [−0.47, +0.53] | 0.86 | no detectable difference |', lambda: _confirm_row('resnet-digits', 0.3)),
    (FINDINGS, '| ResNet, widths 16, 32 | 0.03 | 99.33% | 1 | 0.03 | 99.11% | −0.22 [−0.83, +0.31] | 0.36 | no detectable difference |', lambda: _confirm_row('resnet-digits', 1.0)),
    (FINDINGS, '| ResNet, widths 32, 64 | 0.03 | 99.53% | 0.3 | 0.01 | 99.47% | −0.06 [−0.61, +0.42] | 0.74 | no detectable difference |', lambda: _confirm_row('resnet-digits-w2', 0.3)),
    (FINDINGS, '| ResNet, widths 32, 64 | 0.03 | 99.53% | 1 | 0.003 | 99.25% | −0.28 [−0.94, +0.28] | 0.21 | no detectable difference |', lambda: _confirm_row('resnet-digits-w2', 1.0)),
    (FINDINGS, '| LLaMA, width 128 | 0.003 | 1.555 | 0.3 | 0.003 | 1.560 | +0.004 [−0.000, +0.009] | 0.071 | no detectable difference |', lambda: _confirm_row('llama-bytes', 0.3)),
    (FINDINGS, '| LLaMA, width 128 | 0.003 | 1.555 | 1 | 0.003 | 1.522 | −0.033 [−0.036, −0.029] | 6.9e-08 | better |', lambda: _confirm_row('llama-bytes', 1.0)),
    (FINDINGS, '| LLaMA, width 64 | 0.003 | 1.660 | 0.3 | 0.003 | 1.657 | −0.003 [−0.008, +0.002] | 0.28 | no detectable difference |', lambda: _confirm_row('llama-bytes-w64', 0.3)),
    (FINDINGS, '| LLaMA, width 64 | 0.003 | 1.660 | 1 | 0.003 | 1.636 | −0.024 [−0.030, −0.018] | 0.00011 | better |', lambda: _confirm_row('llama-bytes-w64', 1.0)),
    (FINDINGS, '| ResNet, widths 16, 32 | baseline | 0.03 → 0.095 | 0.0077 → 0.0272 | inside the grid |', lambda: _edge_row(_confirm()["edge_probes"][0])),
    (FINDINGS, '| ResNet, widths 16, 32 | IBNorm-T λ 0.3 | 0.03 → 0.095 | 0.0136 → 0.0101 | **beyond the grid** |', lambda: _edge_row(_confirm()["edge_probes"][1])),
    (FINDINGS, '| ResNet, widths 16, 32 | IBNorm-T λ 1 | 0.03 → 0.095 | 0.0173 → 0.0080 | **beyond the grid** |', lambda: _edge_row(_confirm()["edge_probes"][2])),
    (FINDINGS, '| ResNet, widths 32, 64 | baseline | 0.03 → 0.095 | 0.0052 → 0.0159 | inside the grid |', lambda: _edge_row(_confirm()["edge_probes"][3])),
    (FINDINGS, '| LLaMA, width 128 | baseline | 0.003 → 0.0095 | 1.5748 → 1.7864 | inside the grid |', lambda: _edge_row(_confirm()["edge_probes"][4])),
    (FINDINGS, '| LLaMA, width 128 | IBNorm-T λ 1 | 0.003 → 0.0095 | 1.5530 → 1.6957 | inside the grid |', lambda: _edge_row(_confirm()["edge_probes"][5])),
    (FINDINGS, '| LLaMA, width 128 | IBNorm-T λ 0.3 | 0.003 → 0.0095 | 1.5826 → 1.7631 | inside the grid |', lambda: _edge_row(_confirm()["edge_probes"][6])),
    (FINDINGS, '| LLaMA, width 64 | baseline | 0.003 → 0.0095 | 1.6746 → 1.6842 | inside the grid |', lambda: _edge_row(_confirm()["edge_probes"][7])),
    (FINDINGS, '| LLaMA, width 64 | IBNorm-T λ 1 | 0.003 → 0.0095 | 1.6649 → 1.6504 | **beyond the grid** |', lambda: _edge_row(_confirm()["edge_probes"][8])),
    (FINDINGS, '| LLaMA, width 64 | IBNorm-T λ 0.3 | 0.003 → 0.0095 | 1.6873 → 1.6655 | **beyond the grid** |', lambda: _edge_row(_confirm()["edge_probes"][9])),
    (FINDINGS, '| LLaMA, width 128 | IBNorm-T λ=0.3 | 10 | 2.498 → 2.488, Δ −0.010 [−0.091, +0.072], p_Holm 1 | 1.001 → 1.020, Δ +0.019 [−0.041, +0.078], p_Holm 0.49 |', lambda: _plane_row('llama-bytes', 'ibnorm-t λ=0.3')),
    (FINDINGS, '| LLaMA, width 128 | IBNorm-T λ=1 | 10 | 2.498 → 2.498, Δ +0.000 [−0.093, +0.094], p_Holm 1 | 1.001 → 1.062, Δ +0.061 [+0.020, +0.102], p_Holm 0.017 |', lambda: _plane_row('llama-bytes', 'ibnorm-t λ=1')),
    (FINDINGS, '| LLaMA, width 64 | IBNorm-T λ=0.3 | 10 | 2.575 → 2.602, Δ +0.027 [−0.059, +0.113], p_Holm 0.57 | 1.031 → 1.051, Δ +0.020 [−0.041, +0.080], p_Holm 0.88 |', lambda: _plane_row('llama-bytes-w64', 'ibnorm-t λ=0.3')),
    (FINDINGS, '| LLaMA, width 64 | IBNorm-T λ=1 | 10 | 2.575 → 2.532, Δ −0.042 [−0.127, +0.042], p_Holm 0.57 | 1.031 → 1.058, Δ +0.027 [−0.050, +0.105], p_Holm 0.88 |', lambda: _plane_row('llama-bytes-w64', 'ibnorm-t λ=1')),
    (FINDINGS, '| ResNet, widths 16, 32 | baseline | 0.03 | 99.33% | | | |', lambda: _ext_row('resnet-digits', 'baseline')),
    (FINDINGS, '| ResNet, widths 16, 32 | IBNorm-T λ 0.3 | 0.095 (probe) | 99.28% | −0.06 [−0.58, +0.56] | 0.88 | no detectable difference |', lambda: _ext_row('resnet-digits', 'ibnorm-t λ=0.3')),
    (FINDINGS, '| ResNet, widths 16, 32 | IBNorm-T λ 1 | 0.095 (probe) | 99.19% | −0.14 [−0.75, +0.44] | 0.88 | no detectable difference |', lambda: _ext_row('resnet-digits', 'ibnorm-t λ=1')),
    (FINDINGS, '| LLaMA, width 64 | baseline | 0.003 | 1.660 | | | |', lambda: _ext_row('llama-bytes-w64', 'baseline')),
    (FINDINGS, '| LLaMA, width 64 | IBNorm-T λ 0.3 | 0.0095 (probe) | 1.638 | −0.022 [−0.027, −0.015] | 6.5e-05 | better |', lambda: _ext_row('llama-bytes-w64', 'ibnorm-t λ=0.3')),
    (FINDINGS, '| LLaMA, width 64 | IBNorm-T λ 1 | 0.0095 (probe) | 1.620 | −0.040 [−0.048, −0.033] | 4.8e-06 | better |', lambda: _ext_row('llama-bytes-w64', 'ibnorm-t λ=1')),
    (FINDINGS, '250 runs (the 204 planned, 10 edge probes and 36 seeds of the winning probes) took 7.7 single-core hours', _confirm_core_hours),
    (INFORMATION, '250 runs (the 204 planned, 10 edge probes and 36 seeds of the winning probes) took 7.7 single-core hours', _confirm_core_hours),
    (FINDINGS, "λ = 1 −0.040 nats", lambda: f"λ = 1 {_minus(format(_ext('1')['delta'], '+.3f'))} nats"),
    (FINDINGS, "(−0.022 nats, p_Holm 6.5e-05)", lambda: "({} nats, p_Holm {:.2g})".format(_minus(format(_ext("0.3")["delta"], "+.3f")), _ext("0.3")["p_holm"])),
    (FINDINGS, "−0.033 nats at width 128", lambda: f"{_minus(format(_c_point('llama-bytes', 1.0)['delta'], '+.3f'))} nats at width 128"),
    (FINDINGS, "(p_Holm 6.9e-08) and −0.024 at width 64 (p_Holm 0.00011)", lambda: "(p_Holm {:.2g}) and {} at width 64 (p_Holm {:.2g})".format(
        _c_point("llama-bytes", 1.0)["p_holm"], _minus(format(_c_point("llama-bytes-w64", 1.0)["delta"], "+.3f")), _c_point("llama-bytes-w64", 1.0)["p_holm"])),
    (FINDINGS, "(p 2.8e-07 and 0.0004)", _holm_all8),
    (FINDINGS, "(+0.03 points at λ 0.3, −0.22 at λ 1; −0.06 points at λ 0.3, −0.28 at λ 1)", lambda: "({}; {})".format(
        *[_minus(f"{_c_point(t, 0.3)['delta'] * 100:+.2f} points at λ 0.3, {_c_point(t, 1.0)['delta'] * 100:+.2f} at λ 1") for t in ("resnet-digits", "resnet-digits-w2")])),
    (FINDINGS, "(−0.033, p_Holm 6.9e-08; −0.024, p_Holm 0.00011)", lambda: "({}, p_Holm {:.2g}; {}, p_Holm {:.2g})".format(
        *[v for t in ("llama-bytes", "llama-bytes-w64") for v in (_minus(format(_c_point(t, 1.0)["delta"], "+.3f")), _c_point(t, 1.0)["p_holm"])])),
    (FINDINGS, "lower test loss than RMSNorm on two small byte-level LLaMAs (−0.033 and", lambda: "lower test loss than RMSNorm on two small byte-level LLaMAs ({} and".format(
        _minus(format(_c_point("llama-bytes", 1.0)["delta"], "+.3f")))),
    (FINDINGS, "−0.024 nats, 2–3% perplexity", lambda: f"{_minus(format(_c_point('llama-bytes-w64', 1.0)['delta'], '+.3f'))} nats, 2–3% perplexity"),
    (FINDINGS, "baseline\n1.2% at width 128, 1.0% at width 64", lambda: f"baseline\n{_c_base('llama-bytes')['val_loss_fall_last10']:.1%} at width 128, {_c_base('llama-bytes-w64')['val_loss_fall_last10']:.1%} at width 64"),
    (FINDINGS, "(I(T;Y) +0.061 nats [+0.020, +0.102], p_Holm 0.017)", lambda: (lambda r: f"(I(T;Y) {r['delta']:+.3f} nats [{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}], p_Holm {r['p_holm']:.2g})")(
        next(r for r in _confirm()["information_plane"] if r["task"] == "llama-bytes" and r["arm"] == "ibnorm-t λ=1" and r["quantity"] == "I(T;Y)"))),
    (FINDINGS, "sit at 99.1–99.5% on", lambda: "sit at {:.1%}–{:.1%} on".format(
        min(r["mean"] for r in _c_all("resnet")), max(r["mean"] for r in _c_all("resnet"))).replace("%–", "–", 1)),
    (FINDINGS, "(0.82M- and 0.21M-parameter LLaMAs; CNNs of 20k and 77k parameters)", lambda: "({:.2f}M- and {:.2f}M-parameter LLaMAs; CNNs of {:.0f}k and {:.0f}k parameters)".format(
        *[_c_params(t) / d for t, d in (("llama-bytes", 1e6), ("llama-bytes-w64", 1e6), ("resnet-digits", 1e3), ("resnet-digits-w2", 1e3))])),
    (README, "LLaMAs (−0.033\n  and −0.024 nats of test loss", lambda: "LLaMAs ({}\n  and {} nats of test loss".format(
        *[_minus(format(_c_point(t, 1.0)["delta"], "+.3f")) for t in ("llama-bytes", "llama-bytes-w64")])),
    (INFORMATION, "the planner's estimate had been 3.6 single-core hours", lambda: f"the planner's estimate had been {_estimate()['single_core_hours']:.1f} single-core hours"),
    # section 2: information plane (mi_smollm2)
    (FINDINGS, "12.642 → 12.716", lambda: f"{_conversion_row().group(2)} → {_conversion_row().group(3)}"),
    (FINDINGS, "within +0.59%", lambda: f"within {_conversion_row().group(4)}"),
    (FINDINGS, "KL 0.0051 nats/token against", lambda: f"KL {_json(f'{MI}/calibrated_manifest.json')['end_to_end']['value']:.4f} nats/token against"),
    (FINDINGS, "I(T;Y) drops in 60/61 layers**, from 0.80 to 0.27", lambda: (lambda s, c: f"I(T;Y) drops in {sum(b['I_TY'] < a['I_TY'] for a, b in zip(s, c))}/{len(s)} layers**, from {_mean(s, 'I_TY'):.2f} to {_mean(c, 'I_TY'):.2f}")(*_mi("source_vs_lam0.3.json"))),
    (FINDINGS, "(final norm 0.66 → 0.14)", lambda: (lambda s, c: f"(final norm {s[-1]['I_TY']:.2f} → {c[-1]['I_TY']:.2f})")(*_mi("source_vs_lam0.3.json"))),
    (FINDINGS, "I(X;T) drops in 59/61 layers (2.21 → 1.71 nats)", lambda: (lambda s, c: f"I(X;T) drops in {sum(b['I_XT'] < a['I_XT'] for a, b in zip(s, c))}/{len(s)} layers ({_mean(s, 'I_XT'):.2f} → {_mean(c, 'I_XT'):.2f} nats)")(*_mi("source_vs_lam0.3.json"))),
    (FINDINGS, "I(T;Y) rises in 41/61 layers (+0.010 nats on average)", lambda: (lambda c, f: f"I(T;Y) rises in {sum(b['I_TY'] > a['I_TY'] for a, b in zip(c, f))}/{len(c)} layers ({_mean(f, 'I_TY') - _mean(c, 'I_TY'):+.3f} nats on average)")(_mi("source_vs_lam0.3.json")[1], _mi("finetuned.json")[0])),
    (FINDINGS, "mean I(X;T) 2.207 vs 2.177 nats, mean\n  I(T;Y) 0.797 vs 0.779", lambda: (lambda s, c: f"mean I(X;T) {_mean(s, 'I_XT'):.3f} vs {_mean(c, 'I_XT'):.3f} nats, mean\n  I(T;Y) {_mean(s, 'I_TY'):.3f} vs {_mean(c, 'I_TY'):.3f}")(*_mi("source_vs_calibrated.json"))),
    (FINDINGS, "in 2 layers for\n  I(X;T) (2 lower, 0 higher) and 5 for I(T;Y) (3 lower, 2 higher)", lambda: "in {} layers for\n  I(X;T) ({} lower, {} higher) and {} for I(T;Y) ({} lower, {} higher)".format(
        sum(_beyond_2sigma("I_XT")), *_beyond_2sigma("I_XT"), sum(_beyond_2sigma("I_TY")), *_beyond_2sigma("I_TY"))),
    (FINDINGS, "held-out perplexity 503,818 before and\n  14,212 after", lambda: "held-out perplexity {:,.0f} before and\n  {:,.0f} after".format(*_finetune_ppl())),
    (FINDINGS, "n = 8 half-samples", lambda: "n = {} half-samples".format(re.search(r"over (?:n = )?(\d+) half", _json(f"{MI}/source_vs_lam0.3.json")["error_bars"]).group(1))),
    # docs/information.md: the estimator bias table (mi_estimator_bias/results.json) and analytic bounds
    (INFORMATION, "| 0.5 | 0.575 | 0.889 ± 0.025 | 0.889 ± 0.025", lambda: f"| 0.5 | 0.575 | {_bias(0.5, 'ksg')} | {_bias(0.5, 'ksg-bc')}"),
    (INFORMATION, "| 0.8 | 2.043 | 0.874 ± 0.017 | 1.019 ± 0.028 |", lambda: f"| 0.8 | {-2 * math.log(1 - 0.64):.3f} | {_bias(0.8, 'ksg')} | {_bias(0.8, 'ksg-bc')} |"),
    (INFORMATION, "| 0.9 | 3.321 | 0.848 ± 0.007 | 1.023 ± 0.018 |", lambda: f"| 0.9 | {-2 * math.log(1 - 0.81):.3f} | {_bias(0.9, 'ksg')} | {_bias(0.9, 'ksg-bc')} |"),
    (INFORMATION, "give a mean of 0.010 nats with both", lambda: (lambda r: f"give a mean of {r['ksg']['mean']:.3f} nats with both" if abs(r["ksg"]["mean"] - r["ksg-bc"]["mean"]) < 5e-4 else "differ")(
        next(r for r in _json("benchmarks/results/mi_estimator_bias/results.json")["rows"] if r["rho"] == 0.0))),
    (INFORMATION, "3.22 nats at the defaults", lambda: f"{4 / 2 * math.log(1 + 1 / 0.5 ** 2):.2f} nats at the defaults"),
    (INFORMATION, "I(T;Y) ≤ log 32 = 3.47 nats", lambda: f"I(T;Y) ≤ log 32 = {math.log(32):.2f} nats"),
]


@pytest.mark.parametrize("doc, quoted, compute", FIGURES, ids=[f"{d.split('/')[-1]}:{q[:40]}" for d, q, _ in FIGURES])
def test_a_quoted_figure_is_what_its_results_file_says(doc, quoted, compute):
    assert quoted in _doc(doc), f"{doc} no longer quotes {quoted!r}: update this table with the doc"
    assert compute() == quoted, f"{doc} quotes {quoted!r} but its results file now gives {compute()!r}"


UNTRACED = ["5·10⁵", "1.4·10⁴", "13.554", "13.616", "12.6 to"]


@pytest.mark.parametrize("figure", UNTRACED)
def test_figures_without_a_committed_file_are_not_quoted(figure):
    for doc in (FINDINGS, INFORMATION):
        assert figure not in _doc(doc), f"{doc} quotes {figure}, which no committed results file holds"


def _gpu_cost(preset: str) -> dict:
    return next(p for p in _json("benchmarks/results/study_gpu_cost.json")["presets"] if p["preset"] == preset)


GPU_FIGURES = [
    (INFORMATION, "35 runs, ≈ 35 GPU-hours on an H200", lambda: f"{_gpu_cost('gpu-llama60m')['runs']} runs, ≈ {_gpu_cost('gpu-llama60m')['gpu_hours']:.0f} GPU-hours on an H200"),
    (INFORMATION, "35 runs, ≈ 84 GPU-hours", lambda: f"{_gpu_cost('gpu-llama130m')['runs']} runs, ≈ {_gpu_cost('gpu-llama130m')['gpu_hours']:.0f} GPU-hours"),
]


@pytest.mark.parametrize("doc, quoted, compute", GPU_FIGURES, ids=[q[:30] for _, q, _ in GPU_FIGURES])
def test_the_gpu_cost_table_is_what_the_cost_file_says(doc, quoted, compute):
    assert quoted in _doc(doc) and compute() == quoted
