"""The report of a pretrained comparison: per arm and --train mode, the step-0 figures, the selected
learning rate, the test loss over seeds, and ``stats.compare`` against ``source`` (paired by seed, a
bootstrap interval over seeds and test documents, Holm across the arms, a verdict per arm)."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..charts import Chart, Series, render
from ..finetune import TRAIN_MODES
from .pretrained import SOURCE_ARM, PretrainedStudy, records, run_configs, select_lr, step0_config
from .report import json_safe
from .runner import load_run
from .stats import compare

RUN_FIELDS = ("arm", "train", "step", "lr", "seed", "val", "test", "diverged", "seconds", "tokens_per_second")


def _arm_runs(study: PretrainedStudy, arm) -> tuple[list[dict], dict]:
    """The runs at the arm's selected learning rate (all seeds) and how it was selected."""
    grid = [load_run(study.out, c) for lr in study.lrs for c in run_configs(study, arm, lr, range(1))]
    if not grid or any(r is None for r in grid):
        return [], {"lr": None, "tie": False, "configurations": len(study.lrs), "grid": []}
    lr, tie = select_lr(grid)
    runs = [load_run(study.out, c) for c in run_configs(study, arm, lr, range(study.seeds))]
    return [r for r in runs if r is not None], {"lr": lr, "tie": tie, "configurations": len(grid),
                                                "grid": [{"lr": r["lr"], "val": r["val"]} for r in grid]}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(study: PretrainedStudy) -> dict:
    """``runs`` (every record, step 0 with ``"step": 0``), ``summary`` (a row per arm, step 0 and final)
    and ``comparisons`` (per --train mode, every converted arm against ``source``)."""
    runs = [{k: r.get(k) for k in RUN_FIELDS} | {"test_docs": r["test_docs"]} for r in records_all(study)]
    summary, comparisons = [], []
    for arm in study.arms:
        rec = load_run(study.out, step0_config(study, arm))
        if rec is not None:
            summary.append({"arm": arm.name, "step": 0, "train": None, "val": rec["val"], "test": rec["test"], "test_std": 0.0,
                            "n": 1, "lr": None})
    for train in _trains_present(study):
        s = replace(study, train=train)
        chosen = {arm.name: _arm_runs(s, arm) for arm in study.arms}
        for arm in study.arms:
            runs_, sel = chosen[arm.name]
            mean, std = _mean_std([r["test"] for r in runs_])
            summary.append({"arm": arm.name, "step": study.steps, "train": train, "val": _mean_std([r["val"] for r in runs_])[0],
                            "test": mean, "test_std": std, "n": len(runs_), "lr": sel["lr"], "lr_tie": sel["tie"],
                            "configurations": sel["configurations"], "grid": sel["grid"]})
        values = {a: {r["seed"]: r["test"] for r in chosen[a][0]} for a in chosen}
        docs = {a: {r["seed"]: r["test_docs"] for r in chosen[a][0]} for a in chosen}
        if values.get(SOURCE_ARM) and len(values) > 1:
            for row in compare(values, SOURCE_ARM, lower_is_better=True, alpha=study.alpha, per_document=docs):
                comparisons.append({"train": train, **row})
    return {"runs": runs, "summary": summary, "comparisons": comparisons,
            "protocol": study.protocol(), "arms": [a.name for a in study.arms]}


def _trains_present(study: PretrainedStudy) -> list[str]:
    return [t for t in TRAIN_MODES if (study.out / "runs" / t).is_dir()]


def records_all(study: PretrainedStudy) -> list[dict]:
    seen, out = set(), []
    for train in _trains_present(study) or [study.train]:
        for r in records(replace(study, train=train)):
            key = json.dumps(r["config"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def results_markdown(study: PretrainedStudy, result: dict, command: str, wall: float | None) -> str:
    import torch

    level = 1 - study.alpha
    lines = [f"# ibnorm study --from {study.source}", "", f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible"
             f"{', GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}, torch {torch.__version__}, "
             f"{study.threads} thread(s) per run, device {study.device}"
             + (f"; wall time of this invocation {wall / 60:.1f} min" if wall is not None else ""), "",
             f"Protocol: {study.steps} steps, batch {study.batch_size} × {study.seq_len} tokens, warmup {study.warmup}, "
             f"learning-rate grid {', '.join(f'{lr:g}' for lr in study.lrs)} on seed 0 (selected per arm by validation "
             f"loss), then {study.seeds} seeds at the selected rate. Validation: {study.val_blocks} blocks of "
             f"{study.seq_len} tokens from the training documents' last tenth; test: the first {study.test_docs} "
             f"documents of the held-out text, each scored on its first {study.seq_len} tokens. Converted arms are "
             f"calibrated on `{study.calib}` ({study.calib_samples} samples).", "",
             "## Verdicts (test loss, arm − source, paired by seed)", "",
             f"Interval: {level:.0%} paired bootstrap over seeds and test documents; p: paired t over seeds, Holm-corrected "
             "across the arms of each --train mode.", "",
             "| train | arm | lr | test loss (mean ± std) | Δ vs source | interval | p | p (Holm) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = {(r["train"], r["arm"]): r for r in result["summary"] if r["step"] != 0}
    for c in result["comparisons"]:
        r = rows[(c["train"], c["arm"])]
        iv = "–" if c["interval"] is None else f"[{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}]"
        lines.append(f"| {c['train']} | {c['arm']} | {_f(r['lr'])} | {_f(r['test'])} ± {_f(r['test_std'], 2)} | {c['delta']:+.4f} | "
                     f"{iv} | {_f(c['p'], 2)} | {_f(c['p_holm'], 2)} | {c['verdict']} |")
    lines += ["", "## Every arm", "", "| train | arm | step | lr (configs tried) | n | val loss | test loss (mean ± std) |",
              "|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        lr = "–" if r["lr"] is None else f"{r['lr']:g} ({r['configurations']}{', exact tie' if r.get('lr_tie') else ''})"
        lines.append(f"| {r['train'] or '–'} | {r['arm']} | {r['step']} | {lr} | {r['n']} | {_f(r['val'])} | "
                     f"{_f(r['test'])} ± {_f(r['test_std'], 2)} |")
    lines += ["", "Step 0 is each arm before fine-tuning: what the conversion itself costs. What this cannot show: a "
              "'no detectable difference' verdict is not evidence of equality (the interval bounds the difference the "
              "data still allow); seeds vary only the data order (and LoRA's initialisation), not the dataset, "
              "the recipe or the model.", ""]
    return "\n".join(lines)


def write_charts(study: PretrainedStudy) -> list[str]:
    """Training loss per arm at its selected learning rate: mean over seeds with a ±std band."""
    written = []
    for train in _trains_present(study):
        series = []
        for arm in study.arms:
            runs, _ = _arm_runs(replace(study, train=train), arm)
            seqs = [np.asarray(r["losses"]) for r in runs if r.get("losses") and not r["diverged"]]
            if not seqs:
                continue
            k = max(1, study.steps // 20)
            m = np.stack([np.convolve(s, np.ones(k) / k, mode="valid") for s in seqs])
            mean, std = m.mean(0), m.std(0)
            xs = list(range(k, k + m.shape[1]))
            series.append(Series(f"{arm.name} (n={len(seqs)})", xs, mean.tolist(), (mean - std).tolist(), (mean + std).tolist()))
        if series:
            path = study.out / f"loss_{train}.png"
            path.write_bytes(render(Chart(f"{train}: training loss, mean ± std over seeds", "step", "loss", series)))
            written.append(path.name)
    return written


def write_report(study: PretrainedStudy, command: str, wall: float | None = None) -> dict:
    result = summarize(study)
    (study.out / "results.json").write_text(json.dumps(json_safe({**result, "command": command}), indent=1))
    (study.out / "results.md").write_text(results_markdown(study, result, command, wall))
    result["charts"] = write_charts(study)
    return result
