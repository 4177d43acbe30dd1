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
FINDINGS, INFORMATION = "docs/findings.md", "docs/information.md"
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
    (FINDINGS, "It is 204 runs, estimated\nat 1.8 hours", lambda: f"It is {_estimate()['runs']} runs, estimated\nat {_estimate()['wall_hours']:.1f} hours"),
    (FINDINGS, "(0.198 vs 0.303 s per step) put IBNorm-T's 27 runs of it alone at\n2.3 core-hours", lambda: "({:.3f} vs {:.3f} s per step) put IBNorm-T's {} runs of it alone at\n{:.1f} core-hours".format(
        _row("llama-bytes", "baseline")["s_per_step"], _row("llama-bytes", "ibnorm-t")["s_per_step"],
        next(r["runs"] for r in _estimate()["rows"] if r["task"] == "llama-bytes" and r["normalizer"] == "ibnorm-t"),
        next(r["runs"] for r in _estimate()["rows"] if r["task"] == "llama-bytes" and r["normalizer"] == "ibnorm-t") * 1000 * _row("llama-bytes", "ibnorm-t")["s_per_step"] / 3600)),
    (INFORMATION, "204 runs, ≈ 1.8 h on 2 idle cores", lambda: f"{_estimate()['runs']} runs, ≈ {_estimate()['wall_hours']:.1f} h on 2 idle cores"),
    (INFORMATION, "| 696 runs under the corrected protocol", lambda: f"| {_planned_runs('cpu')} runs under the corrected protocol"),
    (INFORMATION, "212 runs took 137 single-core minutes", lambda: "{} runs took {:.0f} single-core minutes".format(
        len(glob.glob(str(ROOT / STUDY / "runs/*/*/*.json"))),
        sum(json.loads(Path(f).read_text())["s_per_step"] * len(json.loads(Path(f).read_text())["losses"]) for f in glob.glob(str(ROOT / STUDY / "runs/*/*/*.json"))) / 60)),
    # section 2: information plane (mi_smollm2)
    (FINDINGS, "12.642 → 12.716", lambda: f"{_conversion_row().group(2)} → {_conversion_row().group(3)}"),
    (FINDINGS, "within +0.59%", lambda: f"within {_conversion_row().group(4)}"),
    (FINDINGS, "KL 0.0070 nats/token", lambda: f"KL {_conversion_row().group(1)} nats/token"),
    (FINDINGS, "I(T;Y) drops in 61/61 layers**, from 0.80 to 0.27", lambda: (lambda s, c: f"I(T;Y) drops in {sum(b['I_TY'] < a['I_TY'] for a, b in zip(s, c))}/{len(s)} layers**, from {_mean(s, 'I_TY'):.2f} to {_mean(c, 'I_TY'):.2f}")(*_mi("source_vs_lam0.3.json"))),
    (FINDINGS, "(final norm 0.66 → 0.13)", lambda: (lambda s, c: f"(final norm {s[-1]['I_TY']:.2f} → {c[-1]['I_TY']:.2f})")(*_mi("source_vs_lam0.3.json"))),
    (FINDINGS, "I(X;T) drops in 54/61 layers (2.07 → 1.55 nats)", lambda: (lambda s, c: f"I(X;T) drops in {sum(b['I_XT'] < a['I_XT'] for a, b in zip(s, c))}/{len(s)} layers ({_mean(s, 'I_XT'):.2f} → {_mean(c, 'I_XT'):.2f} nats)")(*_mi("source_vs_lam0.3.json"))),
    (FINDINGS, "I(T;Y) rises in 42/61 layers (+0.015 nats on average)", lambda: (lambda c, f: f"I(T;Y) rises in {sum(b['I_TY'] > a['I_TY'] for a, b in zip(c, f))}/{len(c)} layers ({_mean(f, 'I_TY') - _mean(c, 'I_TY'):+.3f} nats on average)")(_mi("source_vs_lam0.3.json")[1], _mi("finetuned.json")[0])),
    (FINDINGS, "mean I(X;T) 2.071 vs 2.076 nats, mean\n  I(T;Y) 0.797 vs 0.795", lambda: (lambda s, c: f"mean I(X;T) {_mean(s, 'I_XT'):.3f} vs {_mean(c, 'I_XT'):.3f} nats, mean\n  I(T;Y) {_mean(s, 'I_TY'):.3f} vs {_mean(c, 'I_TY'):.3f}")(*_mi("source_vs_calibrated.json"))),
    (FINDINGS, "in 7 layers for\n  I(X;T) (4 lower, 3 higher) and 9 for I(T;Y) (6 lower, 3 higher)", lambda: "in {} layers for\n  I(X;T) ({} lower, {} higher) and {} for I(T;Y) ({} lower, {} higher)".format(
        sum(_beyond_2sigma("I_XT")), *_beyond_2sigma("I_XT"), sum(_beyond_2sigma("I_TY")), *_beyond_2sigma("I_TY"))),
    (FINDINGS, "n = 2 half-samples", lambda: "n = {} half-samples".format(re.search(r"over (\d+) half", _json(f"{MI}/source_vs_lam0.3.json")["error_bars"]).group(1))),
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
