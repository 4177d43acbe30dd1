"""How a study picks the configuration each normalizer runs on every seed (pure functions of run records).

* The criterion is the **validation loss** of the tuning seed (continuous: accuracy on a few hundred images
  ties often, one image being 0.28 points). Diverged runs rank last. Test data are never looked at.
* A tie (relative difference ≤ ``TIE_RTOL``) is broken by the mean validation loss over the last three
  evaluations, then by the CRC-32 of the configuration: a fixed rule unrelated to the learning rate or
  weight decay, so it favours neither small nor large steps. Ties are recorded with the selection.
* Every normalizer gets the same tuning budget. The λ-curve normalizer spends its extra configurations on
  λ (each λ point with its own learning-rate search); every other normalizer gets as many extra learning
  rates, log-spaced inside the grid's span (:func:`dense_lrs`).
* A selected learning rate at either end of the learning rates tried is flagged: the optimum may lie outside.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field

import numpy as np

TIE_RTOL = 1e-9
TIE_RULE = ("lowest validation loss of the tuning seed; ties (relative difference ≤ 1e-9) go to the lower mean "
            "validation loss over the last three evaluations, then to the lower CRC-32 of the configuration")


@dataclass
class Selection:
    run: dict  # the chosen run record (tuning seed)
    candidates: int  # configurations compared
    tied_with: list[dict] = field(default_factory=list)  # (lr, wd, λ) of the runs it tied with
    on_edge: bool = False  # lr is the smallest or largest learning rate compared

    def summary(self) -> dict:
        return {"lr": self.run["lr"], "wd": self.run["wd"], "lam": self.run["lam"], "val_loss": self.run.get("val_loss"),
                "candidates": self.candidates, "tied_with": self.tied_with, "lr_on_edge": self.on_edge}


def val_loss(run: dict) -> float:
    v = run.get("val_loss")
    return math.inf if run.get("diverged") or v is None or not math.isfinite(v) else float(v)


def _tail_loss(run: dict) -> float:
    tail = [e["loss"] for e in run.get("evals", [])[-3:] if e.get("loss") is not None]
    return float(np.mean(tail)) if tail else math.inf


def _crc(run: dict) -> int:
    return zlib.crc32(json.dumps(run["config"], sort_keys=True).encode())


def _tied(a: float, b: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= TIE_RTOL * max(abs(a), abs(b)))


def select(runs: list[dict]) -> Selection | None:
    """The run with the lowest validation loss, ties broken as :data:`TIE_RULE` says."""
    runs = [r for r in runs if r is not None]
    if not runs:
        return None
    best_loss = min(val_loss(r) for r in runs)
    tied = [r for r in runs if _tied(val_loss(r), best_loss)]
    chosen = min(tied, key=lambda r: (_tail_loss(r), _crc(r)))
    lrs = {r["lr"] for r in runs}
    others = [{"lr": r["lr"], "wd": r["wd"], "lam": r["lam"]} for r in tied if r is not chosen]
    return Selection(chosen, len(runs), others, chosen["lr"] in (min(lrs), max(lrs)))


def select_best(runs: list[dict]) -> dict | None:
    """The chosen run record (see :func:`select`)."""
    s = select(runs)
    return None if s is None else s.run


def dense_lrs(lrs: list[float], count: int) -> list[float]:
    """``count`` learning rates log-spaced strictly inside the grid's span (3 significant digits), none on it.

    A one-point grid spans lr/3 … 3·lr.
    """
    if count <= 0:
        return []
    lo, hi = (min(lrs), max(lrs)) if len(lrs) > 1 else (lrs[0] / 3, lrs[0] * 3)
    taken = {float(f"{x:.3g}") for x in lrs}
    n = count
    while True:
        new = sorted({float(f"{x:.3g}") for x in np.geomspace(lo, hi, n + 2)[1:-1]} - taken)
        if len(new) >= count:
            return [new[round(i * (len(new) - 1) / max(1, count - 1))] for i in range(count)] if len(new) > count else new
        n += 1
