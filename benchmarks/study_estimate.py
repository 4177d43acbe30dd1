"""Estimate a study preset's wall time from measured per-step times (a few steps per task and normalizer).

    python benchmarks/study_estimate.py confirm --steps 12 --cores 2 [--data builtin:pydoc]

The number of runs comes from the planner itself (a simulated study in a scratch directory, so the
equal tuning budget, the λ points and the seeds are counted as the study would run them); each run costs
steps × s/step measured here (single-threaded, fp32 CPU), plus one final validation and test evaluation,
measured too. Wall time = total single-core time / cores (one run per core). ``--calibrate RUN.json``
times a committed run's configuration right before each measured row and scales that row by (its
recorded s/step) / (measured now), so a machine whose load changes can still estimate an idle one of
the recording machine's speed. ``--data`` replaces the LLaMA
tasks' text for the measurement only (byte vocabularies: the step time does not depend on the text).
Prints a table and writes JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ibnorm.study import get_preset  # noqa: E402
from ibnorm.study.runner import make_config, plan, write_run  # noqa: E402
from ibnorm.study.train import run_one  # noqa: E402


def count_runs(p) -> Counter:
    """(task, normalizer) → runs, from the planner on simulated records (validation loss from a fixed bowl)."""
    import math

    runs: Counter = Counter()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        while True:
            todo, _ = plan(p, out)
            if not todo:
                return runs
            for c in todo:
                loss = (math.log(c["lr"]) - math.log(1e-3)) ** 2 + 0.01 * c["lam"]
                write_run(out, {"config": c, "lr": c["lr"], "wd": c["wd"], "lam": c["lam"], "seed": c["seed"],
                                "normalizer": c["normalizer"], "diverged": False, "val_loss": loss, "evals": []})
                runs[(c["task"]["name"], c["normalizer"])] += 1


def time_steps(p, task: dict, norm: str, steps: int, data: str | None) -> tuple[float, float]:
    """(s/step, seconds of the final evaluations) of ``steps`` training steps, single-threaded."""
    t = copy.deepcopy(task)
    t["steps"], t["eval_every"] = steps, 10 ** 9
    if data and t["kind"] == "lm":
        t["data"] = data
    cfg = make_config(p, t, norm, t["lrs"][0], t["wds"][0], 0)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rec = run_one(cfg, "cpu")
    total = time.perf_counter() - t0
    return rec["s_per_step"], max(0.0, total - rec["s_per_step"] * steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--data", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--calibrate", default=None)
    a = ap.parse_args()
    p = get_preset(a.preset)
    runs = count_runs(p)
    ref = json.loads(Path(a.calibrate).read_text()) if a.calibrate else None

    def scale() -> float:
        if ref is None:
            return 1.0
        t = copy.deepcopy(ref["config"]["task"])
        t["steps"], t["eval_every"] = a.steps, 10 ** 9
        torch.set_num_threads(1)
        return ref["s_per_step"] / run_one({**ref["config"], "task": t}, "cpu")["s_per_step"]
    rows, total = [], 0.0
    for task in p.tasks:
        for norm in p.normalizers:
            k = scale()
            s_step, s_fixed = (v * k for v in time_steps(p, task, norm, a.steps, a.data))
            n = runs[(task["name"], norm)]
            single = n * (task["steps"] * s_step + s_fixed)
            total += single
            rows.append({"task": task["name"], "normalizer": norm, "runs": n, "steps": task["steps"], "s_per_step": s_step, "scale": k,
                         "s_fixed_per_run": s_fixed, "single_core_hours": single / 3600})
            print(f"{task['name']:<16} {norm:<10} runs {n:>4}  {s_step * 1000:7.1f} ms/step  +{s_fixed:5.1f} s/run  ×{k:.3f}  "
                  f"{single / 3600:6.2f} core-h", flush=True)
    res = {"preset": p.name, "cores": a.cores, "measured_steps": a.steps, "calibration": a.calibrate, "rows": rows, "runs": sum(runs.values()),
           "single_core_hours": total / 3600, "wall_hours": total / 3600 / a.cores}
    print(f"{p.name}: {res['runs']} runs, {res['single_core_hours']:.1f} single-core hours, "
          f"≈ {res['wall_hours']:.1f} h wall on {a.cores} idle cores")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
