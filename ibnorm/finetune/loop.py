"""The training loop, top to bottom (on Hugging Face Accelerate, or FSDP2 with ``--shard fsdp``).

The same code runs in one process or under ``torchrun``/``accelerate launch`` (DDP, or FSDP2:
``shard.py``; the choice is ``plan.choose_shard``).  The data order is a pure function of (seed, step), so ``resume``
continues exactly where a run stopped, and N processes see the same global batches as one
process with an N-times larger per-process batch.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..errors import IBNormError
from ..layers import IBNormBase, project_lambdas
from ..loading import open_model
from ..validate import run_fingerprint, seq_len_for, validate_finetune_options
from .checkpoints import latest_checkpoint, prepare_directory, resume, resume_sharded, save_checkpoint, save_sharded_checkpoint
from .data import Examples, build_examples, evaluate_loss, loss_of, read_data
from .options import CHECKPOINT_DIR_SUFFIX, TRAIN_MODES, TRAIN_SEQ_LEN, FinetuneOptions, FinetuneResult, Progress, global_batch_indices, lr_at
from .output import write_output
from .plan import PlanDoesNotFit, memory_plan, resolve_shard, world_size_here
from .shard import FSDPEngine, full_state_dict, full_value, optimizer_for
from .trainable import select_trainable


def lambda_means(model: nn.Module) -> dict[str, float]:
    return {n: float(full_value(m.effective_lam).float().mean()) for n, m in model.named_modules() if isinstance(m, IBNormBase)}


def _validate(opts: FinetuneOptions) -> None:
    if opts.train not in TRAIN_MODES:
        raise IBNormError(f"unknown --train {opts.train!r}; choose one of {', '.join(TRAIN_MODES)}")
    validate_finetune_options(lr=opts.lr, lora_rank=opts.lora_rank, seq_len=opts.seq_len, steps=opts.steps,
                              batch_size=opts.batch_size, grad_accum=opts.grad_accum, warmup=opts.warmup,
                              weight_decay=opts.weight_decay, clip=opts.clip)


def finetune(path: str, opts: FinetuneOptions, progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune the model at ``path``; writes ``opts.out`` in the format ``convert`` writes.

    The memory plan is checked first: a run that would not fit each rank stops (``PlanDoesNotFit``)
    before any data or weights are read."""
    _validate(opts)
    out = Path(opts.out or f"{path.rstrip('/')}-ft")
    if out.exists() and not opts.force:
        raise IBNormError(f"{out} already exists; pass --force to replace it")
    shard = _plan_shard(path, opts)
    raw = read_data(opts)  # the data is checked before any model work
    engine = _engine(shard)
    try:
        return _run(engine, shard, path, opts, out, raw, progress or (lambda _: None))
    finally:
        if shard == "fsdp":
            engine.close()


def _plan_shard(path: str, opts: FinetuneOptions) -> str:
    """The shard mode of this run, after checking that it fits (local model directories have a plan)."""
    world = world_size_here()
    shard = resolve_shard(opts.shard, world)
    if opts.mi_every and shard == "fsdp":
        raise IBNormError("--mi-every is not available with --shard fsdp")
    if not (Path(path) / "config.json").is_file():
        return ("none" if world == 1 else "ddp") if shard == "auto" else shard
    plan = memory_plan(path, opts, shard, world, opts.gpu_memory)
    if not plan.fits:
        raise PlanDoesNotFit(plan)
    return plan.shard


def _engine(shard: str):
    """Accelerate (one process, or DDP) or FSDP2; both offer the calls the loop makes."""
    if shard == "fsdp":
        return FSDPEngine()
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")


def _run(engine, shard: str, path: str, opts: FinetuneOptions, out: Path, raw, progress: Progress) -> FinetuneResult:
    from ..kernels.dispatch import describe

    ckpt_dir = Path(f"{out}{CHECKPOINT_DIR_SUFFIX}")
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    loaded = open_model(path)
    if not raw.images:
        opts = replace(opts, seq_len=seq_len_for(opts.seq_len, getattr(loaded.model, "config", None), TRAIN_SEQ_LEN))
    train_set, held_out = build_examples(raw, loaded, opts, path)
    fingerprint = run_fingerprint(path, opts.recipe(engine.num_processes), [train_set.fingerprint()])
    if engine.is_main_process:
        prepare_directory(ckpt_dir, opts)
    engine.wait_for_everyone()
    model, unwrapped, params, optimizer = _prepare(engine, shard, select_trainable(loaded.model, opts.train, opts.lora_rank), opts)
    cuda = torch.cuda.is_available()
    result = FinetuneResult(str(out), opts.steps, kernel=describe() if cuda else "reference (CPU)",
                            is_main_process=engine.is_main_process)
    start = 0
    if opts.resume:
        restore = resume_sharded if shard == "fsdp" else resume
        state = restore(ckpt_dir, unwrapped, optimizer, fingerprint)
        start = state.step
        result.losses, result.evals = state.progress["losses"], state.progress["evals"]
        result.lambda_trajectory = state.progress["lambda_trajectory"]
        result.information = state.progress.get("information", [])
    device = engine.device
    if opts.compare_source and "manifest" in loaded.info and not raw.images and engine.is_main_process and not opts.resume:
        result.source_eval = _source_eval(loaded.info["manifest"], held_out, opts)
    if start == 0:
        result.evals.append({"step": 0, **evaluate_loss(model, held_out, opts.batch_size, device)})
        _record_lambdas(unwrapped, result)
        _record_information(unwrapped, held_out, opts, 0, result)
    progress({"event": "start", "kernel": result.kernel, "step": start, "steps": opts.steps, "processes": engine.num_processes,
              "shard": shard, "eval": result.evals[-1] if result.evals else None, "source_eval": result.source_eval})

    def save(step: int) -> Path | None:
        if shard == "fsdp":  # collective: every rank writes its shard
            return save_sharded_checkpoint(ckpt_dir, step, model, optimizer, result, opts, fingerprint, engine)
        return save_checkpoint(ckpt_dir, step, unwrapped, optimizer, result, opts, fingerprint) if engine.is_main_process else None

    t0 = time.perf_counter()
    try:
        tokens = _train(engine, model, unwrapped, optimizer, params, train_set, held_out, opts, start, result, progress,
                        save, ckpt_dir)
    except KeyboardInterrupt:
        result.stopped = "interrupted"
        if result.losses:
            saved = save(len(result.losses))
            if engine.is_main_process:
                progress({"event": "interrupted", "checkpoint": str(saved)})
        raise
    result.evals.append({"step": opts.steps, **evaluate_loss(model, held_out, opts.batch_size, device)})
    result.seconds = time.perf_counter() - t0
    result.tokens_per_second = tokens / max(result.seconds, 1e-9)
    _write(engine, shard, model, unwrapped, path, loaded, out, opts, result)
    return result


def _prepare(engine, shard: str, model: nn.Module, opts: FinetuneOptions) -> tuple[nn.Module, nn.Module, list, torch.optim.Optimizer]:
    """(model to run, the model itself, trained parameters, optimizer): sharded in place, or wrapped by Accelerate."""
    if shard == "fsdp":
        model = engine.prepare(model)  # the optimizer is made after: fully_shard replaces the parameters
        params = [p for p in model.parameters() if p.requires_grad]
        return model, model, params, optimizer_for(params, opts)
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped, optimizer = engine.prepare(model, optimizer_for(params, opts))
    return wrapped, engine.unwrap_model(wrapped), params, optimizer


def _write(engine, shard: str, model: nn.Module, unwrapped: nn.Module, path: str, loaded, out: Path, opts: FinetuneOptions,
           result: FinetuneResult) -> None:
    """The output, written by rank 0 with the one writer; a sharded model is first gathered into an
    unsharded copy (rank 0 reopens the model and loads the gathered weights into it)."""
    if shard == "fsdp":
        state = full_state_dict(model)  # collective
        if engine.is_main_process:
            unwrapped = select_trainable(open_model(path).model, opts.train, opts.lora_rank)
            unwrapped.load_state_dict(state)
    if engine.is_main_process:
        write_output(unwrapped, loaded, out, opts, result)
    engine.wait_for_everyone()


def _record_lambdas(model: nn.Module, result: FinetuneResult) -> None:
    for name, value in lambda_means(model).items():
        result.lambda_trajectory.setdefault(name, []).append(value)


def _record_information(model: nn.Module, held_out: Examples, opts: FinetuneOptions, step: int, result: FinetuneResult) -> None:
    """I(X;T), I(T;Y) of every norm on a fixed held-out batch (``ibnorm mi --trajectory`` plots them)."""
    if not opts.mi_every or held_out.labels is not None:
        return
    from ..mi import information_snapshot

    batch = held_out.inputs[: max(1, min(len(held_out), 4))].to(next(model.parameters()).device)
    result.information.append({"step": step, "mi": information_snapshot(model, batch, seed=opts.seed)})


def _train(accelerator, model, unwrapped, optimizer, params, train_set: Examples, held_out: Examples, opts: FinetuneOptions,
           start: int, result: FinetuneResult, progress: Progress, save, ckpt_dir: Path) -> int:
    """Steps ``start``…``opts.steps``; returns the number of tokens (or images) seen."""
    device, world = accelerator.device, accelerator.num_processes
    model.train()
    t0, tokens = time.perf_counter(), 0
    for step in range(start, opts.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, opts)
        step_loss = torch.zeros((), device=device)
        for micro in range(opts.grad_accum):
            idx = global_batch_indices(step, micro, len(train_set), opts.batch_size * world, opts.grad_accum, opts.seed)
            batch = train_set.take(idx[accelerator.process_index :: world])
            x, y = batch.inputs.to(device), None if batch.labels is None else batch.labels.to(device)
            last_micro = micro == opts.grad_accum - 1
            with (accelerator.no_sync(model) if not last_micro and world > 1 else nullcontext()), accelerator.autocast():
                loss = loss_of(model, x, y)
                accelerator.backward(loss / opts.grad_accum)
            step_loss += loss.detach() / opts.grad_accum
            tokens += x.numel() * world
        loss_value = float(accelerator.reduce(step_loss, reduction="mean"))
        if not math.isfinite(loss_value):
            last = latest_checkpoint(ckpt_dir)
            raise IBNormError(f"loss became {loss_value} at step {step + 1}; stopped"
                              + (f" (last good checkpoint: {last})" if last else " (no checkpoint was written)"))
        if opts.clip > 0:
            accelerator.clip_grad_norm_(params, opts.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        project_lambdas(unwrapped)
        result.losses.append(loss_value)
        _record_lambdas(unwrapped, result)
        done = step + 1
        record = {"event": "step", "step": done, "steps": opts.steps, "loss": loss_value, "lr": lr_at(step, opts),
                  "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9)}
        if opts.mi_every and done % opts.mi_every == 0:
            _record_information(unwrapped, held_out, opts, done, result)
        if opts.eval_every and done % opts.eval_every == 0 and done != opts.steps:
            result.evals.append({"step": done, **evaluate_loss(model, held_out, opts.batch_size, device)})
            record["eval"] = result.evals[-1]
        progress(record)
        if opts.save_every and done % opts.save_every == 0:
            save(done)
    return tokens


def _source_eval(manifest: dict, held_out: Examples, opts: FinetuneOptions) -> dict | None:
    """The source model's figures on the same held-out examples, when the manifest names a loadable source."""
    from ..io.sources import load_source

    try:
        src = load_source(manifest["source"]["resolved"])
    except Exception:
        return None
    return evaluate_loss(src.model, held_out, opts.batch_size, "cpu")
