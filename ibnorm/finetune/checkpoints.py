"""Checkpoints of a fine-tune: written atomically, resumed only by the run that wrote them.

A checkpoint records the run's fingerprint (``validate.run_fingerprint``: the model it started
from, the recipe, the data), and ``resume`` refuses a checkpoint of another run and loads its
weights strictly.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import IBNormError
from ..io.atomic import atomic_directory
from ..io.checkpoint import write_json_atomic
from ..validate import load_trainer_state, read_checkpoint, read_progress
from .options import FinetuneOptions, FinetuneResult

_KEEP = 2  # newest checkpoints kept


def dedup(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses shared storage (tied embeddings): keep one name per storage."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*")) if directory.exists() else []
    return found[-1] if found else None


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, result: FinetuneResult,
                    opts: FinetuneOptions, fingerprint: str) -> Path:
    """Everything ``resume`` needs, written atomically (a half-written checkpoint never appears)."""
    from safetensors.torch import save_file

    target = directory / f"step-{step:07d}"
    with atomic_directory(target, force=True) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(dedup(state), str(tmp / "model.safetensors"))
        _write_progress(tmp, step, optimizer.state_dict(), result, opts, fingerprint)
    _prune(directory)
    return target


def _write_progress(tmp: Path, step: int, optimizer_state: dict | None, result: FinetuneResult, opts: FinetuneOptions,
                    fingerprint: str) -> None:
    torch.save({"optimizer": optimizer_state, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
               tmp / "trainer_state.pt")
    write_json_atomic(tmp / "progress.json", {"step": step, "losses": result.losses, "evals": result.evals,
                                              "lambda_trajectory": result.lambda_trajectory, "information": result.information,
                                              "fingerprint": fingerprint, "options": opts.recipe()})


def _prune(directory: Path) -> None:
    for old in sorted(directory.glob("step-*"))[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, result: FinetuneResult,
                            opts: FinetuneOptions, fingerprint: str, engine) -> Path:
    """A sharded checkpoint (torch.distributed.checkpoint: each rank writes its shard; collective).
    Written into a temporary sibling that rank 0 renames once every shard and the progress are in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = directory / f"step-{step:07d}"
    tmp = directory / f".{target.name}.tmp"
    if engine.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.wait_for_everyone()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    if engine.is_main_process:
        _write_progress(tmp, step, None, result, opts, fingerprint)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        _prune(directory)
    engine.wait_for_everyone()
    return target


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / ".metadata").is_file()


def prepare_directory(directory: Path, opts: FinetuneOptions) -> None:
    """A fresh run starts with no checkpoints of another: cleared with --force, refused otherwise."""
    if opts.resume or latest_checkpoint(directory) is None:
        return
    if not opts.force:
        raise IBNormError(f"{directory} holds checkpoints of an earlier run: pass --resume to continue it, "
                          f"or --force to start over (they are deleted)")
    shutil.rmtree(directory)


@dataclass
class Resumed:
    step: int
    progress: dict


def resume(directory: Path, model: nn.Module, optimizer, fingerprint: str) -> Resumed:
    """Restore the newest checkpoint of this run: weights (strictly), optimizer, RNG and progress.

    ``validate.read_checkpoint`` refuses, before anything is restored, a damaged checkpoint, one of
    another run (fingerprint), and weights that would not restore every parameter exactly."""
    from safetensors.torch import load_file

    ckpt = _latest_of_kind(directory, sharded=False)
    stored = dedup(model.state_dict())
    params = {n: tuple(p.shape) for n, p in stored.items() if p.is_floating_point()}
    progress = read_checkpoint(ckpt, fingerprint, params)
    trainer = load_trainer_state(ckpt / "trainer_state.pt")
    state = load_file(str(ckpt / "model.safetensors"))
    if set(state) != set(stored):
        raise IBNormError(f"--resume: {ckpt} does not fit this model (tensors differ)")
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    optimizer.load_state_dict(trainer["optimizer"])
    _restore_rng(trainer)
    return Resumed(int(progress["step"]), progress)


def _latest_of_kind(directory: Path, sharded: bool) -> Path:
    ckpt = latest_checkpoint(directory)
    if ckpt is None:
        raise IBNormError(f"--resume: no checkpoint in {directory}")
    if is_sharded(ckpt) != sharded:
        how = "sharded (--shard fsdp)" if is_sharded(ckpt) else "unsharded (--shard none or ddp)"
        raise IBNormError(f"--resume: {ckpt} was written {how}; resume it the same way")
    return ckpt


def _restore_rng(trainer: dict) -> None:
    torch.set_rng_state(trainer["rng"]["torch"])
    random.setstate(trainer["rng"]["python"])


def resume_sharded(directory: Path, model: nn.Module, optimizer, fingerprint: str) -> Resumed:
    """Restore the newest sharded checkpoint of this run on any number of ranks (DCP reshards); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = _latest_of_kind(directory, sharded=True)
    progress = read_progress(ckpt, fingerprint)  # a checkpoint of another run is refused before anything loads
    trainer = load_trainer_state(ckpt / "trainer_state.pt")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=str(ckpt))
    except Exception as e:  # noqa: BLE001  DCP raises CheckpointException, RuntimeError, KeyError for a mismatch
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise IBNormError(f"--resume: {ckpt} does not fit this model ({first})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    _restore_rng(trainer)
    return Resumed(int(progress["step"]), progress)
