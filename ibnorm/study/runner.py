"""Plan, run and resume a study.  Each run is one JSON file under ``OUT/runs``; a finished run is
never repeated, so an interrupted study resumes and directories from several machines merge.

Phases per task and normalizer (selection.py says how a configuration is chosen): the lr × wd grid on the
tuning seed; then, at the grid's chosen wd, the extra configurations of the equal budget (IBNorm-T: its
other λ values × every lr; the others: extra learning rates); then the choice — and each λ point at its own
lr — on every seed; last, with ``probe_edges``, one tuning-seed run beyond each selection on the grid's edge
(edges.py: a diagnostic, never a candidate), and every seed of a probe that won (the secondary analysis).  A run interrupted by ``time_limit`` resumes from its mid-run checkpoint."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from ..errors import IBNormError
from . import edges
from .presets import Preset
from .selection import Selection, dense_lrs, select, select_best  # noqa: F401  (select_best: public, re-exported)

FIXED_LAMBDA = ("ibnorm-s", "ibnorm-l", "ibnorm-t", "ibnorm-s-learn", "ibnorm-l-learn", "ibnorm-t-learn")
LAMBDA_CURVE_NORMALIZER = "ibnorm-t"


class StudyError(IBNormError):
    pass


def _task_key(task: dict) -> dict:
    return {k: v for k, v in task.items() if k not in ("lrs", "wds")}


def make_config(p: Preset, task: dict, normalizer: str, lr: float, wd: float, seed: int, lam: float | None = None) -> dict:
    lam = (p.lam if lam is None else lam) if normalizer in FIXED_LAMBDA else 0.0
    return {"task": _task_key(task), "normalizer": normalizer, "lam": lam, "lr": lr, "wd": wd, "seed": seed,
            "threads": p.threads, "device": p.device}


def run_path(out: Path, cfg: dict) -> Path:
    if "run" in cfg:  # a run that names its own place (the pretrained comparison)
        return out / "runs" / f"{cfg['run']}.json"
    return out / "runs" / cfg["task"]["name"] / cfg["normalizer"] / f"lam{cfg['lam']:g}_lr{cfg['lr']:g}_wd{cfg['wd']:g}_s{cfg['seed']}.json"


def load_run(out: Path, cfg: dict) -> dict | None:
    path = run_path(out, cfg)
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise StudyError(f"{path} is not valid JSON (delete it to rerun that run)") from None
    if _identity(rec.get("config") or {}) != _identity(cfg):
        raise StudyError(f"{path} holds a run of a different configuration; use another --out for this preset")
    return rec


RUNTIME_KEYS = ("threads",)  # how a run executes, not what it computes: a run is resumed under other settings


def _identity(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}


def write_run(out: Path, rec: dict) -> Path:
    path = run_path(out, rec["config"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, path)  # atomic: a run file is either complete or absent
    return path


@dataclass
class Tuning:
    """The tuning-seed runs of one normalizer on one task and what they select (None until complete)."""

    grid: list[dict]  # configurations of the lr × wd grid (at the preset's λ)
    grid_runs: list[dict | None]
    extra: list[dict] = field(default_factory=list)  # the extra configurations at the grid's chosen wd
    extra_runs: list[dict | None] = field(default_factory=list)
    budget: int = 0  # configurations this normalizer is given (equal for every normalizer of a task)
    chosen: Selection | None = None  # over grid and extra
    per_lambda: dict[float, Selection] = field(default_factory=dict)  # the λ-curve normalizer: each λ's own lr

    @property
    def complete(self) -> bool:
        return self.chosen is not None


def extra_count(p: Preset, task: dict) -> int:
    """Extra tuning configurations: the λ-curve normalizer's λ search (each further λ × every lr)."""
    if LAMBDA_CURVE_NORMALIZER not in p.normalizers:
        return 0
    return len(lambda_points(p)[1:]) * len(task["lrs"])


def lambda_points(p: Preset) -> list[float]:
    """The preset's λ first, then the other λ-curve values."""
    return [p.lam] + sorted(lam for lam in set(p.lam_curve) if lam != p.lam)


def tuning(p: Preset, out: Path, task: dict, norm: str) -> Tuning:
    seed = p.first_seed
    grid = [make_config(p, task, norm, lr, wd, seed) for lr in task["lrs"] for wd in task["wds"]]
    t = Tuning(grid, [load_run(out, c) for c in grid], budget=len(grid) + extra_count(p, task))
    if any(r is None for r in t.grid_runs):
        return t
    wd = select(t.grid_runs).run["wd"]
    if norm == LAMBDA_CURVE_NORMALIZER:
        t.extra = [make_config(p, task, norm, lr, wd, seed, lam) for lam in lambda_points(p)[1:] for lr in task["lrs"]]
    else:
        t.extra = [make_config(p, task, norm, lr, wd, seed) for lr in dense_lrs(task["lrs"], extra_count(p, task))]
    t.extra_runs = [load_run(out, c) for c in t.extra]
    if any(r is None for r in t.extra_runs):
        return t
    runs = t.grid_runs + t.extra_runs
    t.chosen = select(runs)
    if norm == LAMBDA_CURVE_NORMALIZER:
        t.per_lambda = {lam: select([r for r in runs if r["lam"] == lam]) for lam in lambda_points(p)}
    return t


def seed_configs(p: Preset, run: dict) -> list[dict]:
    """The chosen run's configuration on every evaluation seed."""
    c = run["config"]
    return [make_config(p, c["task"], c["normalizer"], c["lr"], c["wd"], s, c["lam"]) for s in p.seed_numbers()]


def plan(p: Preset, out: Path) -> tuple[list[dict], int]:
    """Runs that can start now (in priority order) and how many are finished."""
    todo: list[dict] = []
    probes: list[dict] = []  # after every other run: they only inform the report
    done = 0
    for task in p.tasks:
        tunings = {norm: tuning(p, out, task, norm) for norm in p.normalizers}
        for t in tunings.values():
            for cfgs, recs in ((t.grid, t.grid_runs), (t.extra, t.extra_runs)):
                done += sum(r is not None for r in recs)
                todo += [c for c, r in zip(cfgs, recs) if r is None]
        for t in tunings.values():
            if not t.complete:
                continue
            tuned = {json.dumps(c, sort_keys=True) for c in t.grid + t.extra}
            chosen = [t.chosen.run] + [s.run for s in t.per_lambda.values()]
            cfgs = {json.dumps(c, sort_keys=True): c for run in chosen for c in seed_configs(p, run)}
            for key, c in cfgs.items():
                if key in tuned:
                    continue  # the tuning seed's run, counted above
                if load_run(out, c) is None:
                    todo.append(c)
                else:
                    done += 1
            for sel in edges.selections(t.chosen, t.per_lambda) if p.probe_edges else []:
                run = extended_choice(p, out, task, sel)
                cfgs = [] if run is sel.run else seed_configs(p, run)  # a winning probe: its other seeds
                cfg = edges.probe_config(sel, task["lrs"])
                for c in ([cfg] if cfg and run is sel.run else []) + cfgs:
                    if load_run(out, c) is None:
                        probes.append(c)
                    else:
                        done += 1
    return todo + probes, done


def extended_choice(p: Preset, out: Path, task: dict, sel: Selection) -> dict:
    """A selection's run, or its edge probe's where the probe ran and won (edges.py: the secondary analysis)."""
    cfg = edges.probe_config(sel, task["lrs"]) if p.probe_edges else None
    rec = load_run(out, cfg) if cfg else None
    return rec if rec is not None and edges.won(rec, sel) else sel.run


def checkpoint_path(out: Path, cfg: dict) -> Path:
    """Where a run's mid-run checkpoint lives (removed when the run finishes)."""
    return out / "checkpoints" / run_path(out, cfg).relative_to(out / "runs").with_suffix("")


ENTRY_PACKAGE = "ibnorm.study."


def run_config(cfg: dict, out: Path, deadline: float | None = None) -> dict | None:
    """The record of one run (None when stopped at the deadline): ``train.run_one`` (from scratch), or the
    function a config names in ``entry`` (``ibnorm.study.MODULE:FUNCTION``, called with the config and the
    study directory; it checkpoints and resumes by itself and runs to its end)."""
    if "entry" not in cfg:
        from .train import run_one

        return run_one(cfg, checkpoint=checkpoint_path(out, cfg), deadline=deadline)
    module, _, name = cfg["entry"].partition(":")
    if not module.startswith(ENTRY_PACKAGE):
        raise StudyError(f"run entry {cfg['entry']!r} is not in {ENTRY_PACKAGE.rstrip('.')}")
    return getattr(importlib.import_module(module), name)(cfg, out)


def _execute(cfg: dict, out: str, deadline: float | None = None) -> str | None:
    """Pool worker: one run in this process, single-threaded as configured; None when stopped at the deadline."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        rec = run_config(cfg, Path(out), deadline)
        return None if rec is None else str(write_run(Path(out), rec))
    finally:
        torch.set_num_threads(before)  # the inline path runs in the caller's process


def _launch(p: Preset, cfg: dict, out: Path, deadline: float | None = None) -> str | None:
    """One run as its own torchrun / accelerate job (all local GPUs unless the preset says)."""
    import torch

    nproc = p.nproc or max(1, torch.cuda.device_count())
    out.mkdir(parents=True, exist_ok=True)
    fd, cfg_path = tempfile.mkstemp(dir=out, suffix=".cfg.json")
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    if p.launcher == "accelerate":
        cmd = ["accelerate", "launch", "--num_processes", str(nproc), "-m", "ibnorm.study.worker", cfg_path, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "ibnorm.study.worker", cfg_path, str(out)]
    cmd += [] if deadline is None else [repr(deadline)]
    try:
        subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as e:
        raise StudyError(f"launched run failed with exit code {e.returncode}: {' '.join(cmd)}") from None
    finally:
        os.unlink(cfg_path)
    return str(run_path(out, cfg)) if run_path(out, cfg).exists() else None


def run_study(p: Preset, out: Path, progress: Callable[[dict], None] | None = None, jobs: int | None = None,
              shard: tuple[int, int] = (0, 1), time_limit: float | None = None,
              planner: Callable[[Path], tuple[list[dict], int]] | None = None) -> bool:
    """Run every pending run of ``p`` into ``out`` until nothing more can start; True when complete.

    ``shard=(i, n)``: only runs whose position in a stable order is i mod n (job arrays); rerun
    the array after it finishes to reach the next phase (seeds follow the grid search).
    ``time_limit`` (seconds): no run starts after it, and running ones save a mid-run checkpoint and stop
    (the next invocation resumes them), so a fixed machine slot advances a long study.
    ``planner``: what ``plan`` does for another kind of study (``p`` then needs only ``jobs``,
    ``launcher`` and ``nproc``).
    """
    import time

    deadline = None if time_limit is None else time.time() + time_limit
    jobs = jobs or p.jobs
    notify = progress or (lambda e: None)
    pending: dict[Future, dict] = {}
    started: set[str] = set()
    paused = False
    ctx = get_context("spawn")  # fresh interpreters: no inherited thread pools or RNG state
    # one job runs in this process (no interpreter start-up); several in fresh spawned ones
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) if p.launcher is None and jobs > 1 else _Inline() as pool:
        while True:
            todo, done = planner(out) if planner is not None else plan(p, out)
            todo = [c for c in todo if _in_shard(c, shard) and str(run_path(out, c)) not in started]
            notify({"event": "plan", "done": done, "pending": len(todo) + len(pending)})
            while todo and len(pending) < jobs and not (deadline and time.time() >= deadline):
                cfg = todo.pop(0)
                started.add(str(run_path(out, cfg)))
                fut = pool.submit(_execute, cfg, str(out), deadline) if p.launcher is None else pool.submit(_launch, p, cfg, out, deadline)
                pending[fut] = cfg
            if not pending:
                return not todo and not paused
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                cfg = pending.pop(fut)
                if fut.result() is None:  # re-raises a failed run here; None: stopped at the deadline
                    paused = True
                    notify({"event": "paused", "config": cfg})
                    continue
                notify({"event": "run", "config": cfg, "record": load_run(out, cfg)})


def _in_shard(cfg: dict, shard: tuple[int, int]) -> bool:
    import zlib

    i, n = shard
    key = json.dumps(cfg, sort_keys=True).encode()
    return n <= 1 or zlib.crc32(key) % n == i


class _Inline:
    """An executor that runs each submission at once (launched runs are already separate processes)."""

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # handed to the caller through the future, as a pool would
            fut.set_exception(e)
        return fut
