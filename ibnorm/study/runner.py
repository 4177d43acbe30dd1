"""Plan, run and resume a study.  Each run is one JSON file under ``OUT/runs``; a finished run is
never repeated, so an interrupted study resumes and directories from several machines merge."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from ..errors import IBNormError
from .presets import Preset
from .train import LOWER_IS_BETTER

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


def select_best(runs: list[dict]) -> dict | None:
    """The seed-0 run with the best validation metric (diverged runs rank last)."""
    if not runs:
        return None
    lower = runs[0]["metric"] in LOWER_IS_BETTER

    def key(r: dict) -> float:
        if r["diverged"] or r["val"] is None:
            return float("inf")
        return r["val"] if lower else -r["val"]

    return min(runs, key=lambda r: (key(r), r["lr"], r["wd"]))


def plan(p: Preset, out: Path) -> tuple[list[dict], int]:
    """Runs that can start now (in priority order) and how many are finished."""
    todo: list[dict] = []
    done = 0
    for task in p.tasks:
        grids = {}
        for norm in p.normalizers:
            grid = [make_config(p, task, norm, lr, wd, 0) for lr in task["lrs"] for wd in task["wds"]]
            recs = [load_run(out, c) for c in grid]
            done += sum(r is not None for r in recs)
            todo += [c for c, r in zip(grid, recs) if r is None]
            grids[norm] = select_best(recs) if all(r is not None for r in recs) else None
        for norm, best in grids.items():
            if best is None:
                continue
            cfgs = [make_config(p, task, norm, best["lr"], best["wd"], s) for s in range(1, p.seeds)]
            if norm == LAMBDA_CURVE_NORMALIZER:
                cfgs += [make_config(p, task, norm, best["lr"], best["wd"], s, lam)
                         for lam in p.lam_curve if lam != p.lam for s in range(p.seeds)]
            for c in cfgs:
                if load_run(out, c) is None:
                    todo.append(c)
                else:
                    done += 1
    return todo, done


ENTRY_PACKAGE = "ibnorm.study."


def run_config(cfg: dict, out: Path) -> dict:
    """The record of one run: ``train.run_one`` (from scratch), or the function a config names in
    ``entry`` (``ibnorm.study.MODULE:FUNCTION``, called with the config and the study directory)."""
    if "entry" not in cfg:
        from .train import run_one

        return run_one(cfg)
    module, _, name = cfg["entry"].partition(":")
    if not module.startswith(ENTRY_PACKAGE):
        raise StudyError(f"run entry {cfg['entry']!r} is not in {ENTRY_PACKAGE.rstrip('.')}")
    return getattr(importlib.import_module(module), name)(cfg, out)


def _execute(cfg: dict, out: str) -> str:
    """Pool worker: one run in this process, single-threaded as configured."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        return str(write_run(Path(out), run_config(cfg, Path(out))))
    finally:
        torch.set_num_threads(before)  # the inline path runs in the caller's process


def _launch(p: Preset, cfg: dict, out: Path) -> str:
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
    try:
        subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as e:
        raise StudyError(f"launched run failed with exit code {e.returncode}: {' '.join(cmd)}") from None
    finally:
        os.unlink(cfg_path)
    return str(run_path(out, cfg))


def run_study(p: Preset, out: Path, progress: Callable[[dict], None] | None = None, jobs: int | None = None,
              shard: tuple[int, int] = (0, 1), planner: Callable[[Path], tuple[list[dict], int]] | None = None) -> None:
    """Run every pending run of ``p`` into ``out`` until nothing more can start.

    ``shard=(i, n)``: only runs whose position in a stable order is i mod n (job arrays); rerun
    the array after it finishes to reach the next phase (seeds follow the grid search).
    ``planner``: what ``plan`` does for another kind of study (``p`` then needs only ``jobs``,
    ``launcher`` and ``nproc``).
    """
    jobs = jobs or p.jobs
    notify = progress or (lambda e: None)
    pending: dict[Future, dict] = {}
    started: set[str] = set()
    ctx = get_context("spawn")  # fresh interpreters: no inherited thread pools or RNG state
    # one job runs in this process (no interpreter start-up); several in fresh spawned ones
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) if p.launcher is None and jobs > 1 else _Inline() as pool:
        while True:
            todo, done = planner(out) if planner is not None else plan(p, out)
            todo = [c for c in todo if _in_shard(c, shard) and str(run_path(out, c)) not in started]
            notify({"event": "plan", "done": done, "pending": len(todo) + len(pending)})
            while todo and len(pending) < jobs:
                cfg = todo.pop(0)
                started.add(str(run_path(out, cfg)))
                fut = pool.submit(_execute, cfg, str(out)) if p.launcher is None else pool.submit(_launch, p, cfg, out)
                pending[fut] = cfg
            if not pending:
                return
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                cfg = pending.pop(fut)
                fut.result()  # re-raise a failed run here
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
