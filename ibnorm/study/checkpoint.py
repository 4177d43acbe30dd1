"""Mid-run checkpoints of a study run, so a run longer than a machine slot advances slot by slot.

A checkpoint is a directory: ``model.safetensors`` (weights and buffers), ``state.pt`` (the optimizer's
state and the data generator's state; tensors and numbers only, read with ``weights_only=True``) and
``progress.json`` (the step reached, the losses and evaluations so far, and the run's configuration, which
must match to resume). It is written atomically (a temporary directory renamed into place) and removed
when the run finishes. Resuming reproduces the uninterrupted run exactly on the same device.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class Progress:
    step: int = 0  # steps done
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    train_s: float = 0.0
    act_bytes: int = 0


def save(path: Path, cfg: dict, model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator, prog: Progress) -> None:
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, suffix=".tmp"))
    save_model(model, str(tmp / "model.safetensors"))  # handles tied weights (the LLaMA's embeddings)
    torch.save({"optimizer": opt.state_dict(), "generator": g.get_state()}, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps({"config": cfg, **asdict(prog)}))
    old = path.with_suffix(".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def restore(path: Path, cfg: dict, model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> Progress | None:
    """The progress of a checkpoint of this very configuration (model, optimizer and generator loaded), else None."""
    from safetensors.torch import load_model

    if not (path / "progress.json").exists():
        return None
    rec = json.loads((path / "progress.json").read_text())
    if rec.pop("config") != cfg:
        return None  # another configuration's leftovers: start afresh (the run file decides what is done)
    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    g.set_state(state["generator"])
    return Progress(**rec)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
