"""Edge probes: is a learning rate chosen at the end of the grid really the optimum?

When a selection (a normalizer's choice, or one λ point of the curve) lands on the smallest or largest
learning rate it was compared with (``Selection.on_edge``), the optimum may lie outside the grid.  A probe is one run on the tuning seed,
one grid step (the grid's geometric step) beyond that end, with everything else as selected.  It is a
diagnostic, never a candidate: letting it change a selection would give the normalizers that sit on an
edge a larger tuning budget than the others, and the seeds already run would no longer be the choice.
The report states, per probe, whether its validation loss is higher (the optimum is inside the grid: the
grid brackets it) or lower (it lies beyond: the comparison ran that normalizer away from its best lr).

A probe that wins is then run on every seed, and the report adds a *secondary* comparison at the extended
choice (each selection replaced by its probe where the probe won): a mechanical rule, the same for every
normalizer, reported beside the primary comparison and never instead of it.
"""

from __future__ import annotations

import math

from .selection import Selection, val_loss

PROBE_DIGITS = 2  # significant digits of a probe's learning rate


def grid_step(lrs: list[float]) -> float:
    """The grid's geometric step, (max / min)^(1 / (n − 1)); 3 for a one-point grid."""
    lo, hi = min(lrs), max(lrs)
    return 3.0 if len(lrs) < 2 or hi <= lo else (hi / lo) ** (1.0 / (len(lrs) - 1))


def beyond(lrs: list[float], lr: float) -> float:
    """The learning rate one grid step beyond ``lr``, an end of the learning rates tried: above it when ``lr`` is
    in the grid's upper half (log scale), below it otherwise."""
    step = grid_step(lrs)
    up = lr >= math.sqrt(min(lrs) * max(lrs))
    return float(f"{(lr * step if up else lr / step):.{PROBE_DIGITS}g}")


def selections(chosen: Selection | None, per_lambda: dict[float, Selection]) -> list[Selection]:
    """A normalizer's distinct selections: its choice, then each λ point's (one probe per configuration)."""
    out: dict[str, Selection] = {}
    for sel in ([chosen] if chosen else []) + list(per_lambda.values()):
        c = sel.run["config"]
        out.setdefault(f"{c['lam']}|{c['lr']}|{c['wd']}", sel)
    return list(out.values())


def probe_config(sel: Selection, lrs: list[float]) -> dict | None:
    """The probe of one selection (its configuration at the lr beyond the edge), or None if it is not on an edge."""
    return {**sel.run["config"], "lr": beyond(lrs, sel.run["config"]["lr"])} if sel.on_edge else None


def won(probe: dict, sel: Selection) -> bool:
    """The probe's validation loss is lower than its selection's (a diverged or non-finite probe never wins)."""
    return val_loss(probe) < val_loss(sel.run)


def probe_row(task: str, sel: Selection, probe: dict) -> dict:
    """What one finished probe says about its selection."""
    chosen, tried = val_loss(sel.run), val_loss(probe)
    inside = not won(probe, sel)
    return {"task": task, "normalizer": sel.run["config"]["normalizer"], "lam": sel.run["config"]["lam"],
            "wd": sel.run["config"]["wd"], "lr": sel.run["config"]["lr"], "val_loss": chosen,
            "probe_lr": probe["config"]["lr"], "probe_val_loss": tried if math.isfinite(tried) else None,
            "probe_diverged": bool(probe.get("diverged")), "bracketed": inside}


def describe(row: dict) -> str:
    """One line for the report's warnings."""
    probe = "diverged" if row["probe_diverged"] or row["probe_val_loss"] is None else f"validation loss {row['probe_val_loss']:.4g}"
    where = ("higher: the grid brackets the optimum" if row["bracketed"]
             else "lower: the optimum lies beyond the grid, the comparison ran away from this normalizer's best lr")
    return (f"{row['task']} {row['normalizer']} λ={row['lam']:g}: lr {row['lr']:g} on the grid's edge (validation loss "
            f"{row['val_loss']:.4g}); one step beyond, lr {row['probe_lr']:g}: {probe} — {where}")
