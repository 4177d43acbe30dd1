"""Short adaptation fine-tuning of converted models, on Hugging Face Accelerate.

The same code runs in one process or under ``torchrun``/``accelerate launch`` (DDP; FSDP through
an accelerate config): Accelerate owns the distributed part.  The data order is a pure function
of (seed, step), so ``resume`` continues exactly where a run stopped, and N processes see the
same global batches as one process with an N-times larger per-process batch.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .data import image_folder, is_image_folder, load_images, read_texts, token_blocks
from .errors import IBNormError
from .io.checkpoint import atomic_directory, save_converted, write_json_atomic
from .io.open_model import open_model
from .layers import IBNormBase, project_lambdas

TRAIN_MODES = ("norms", "all", "lora")
CHECKPOINT_DIR_SUFFIX = "-checkpoints"


@dataclass
class FinetuneOptions:
    data: str
    steps: int = 1000
    out: str | None = None
    eval_data: str | None = None  # default: the last 10% of the training blocks
    eval_every: int = 100
    eval_blocks: int = 16
    train: str = "norms"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 20
    batch_size: int = 4  # per process and micro-step
    grad_accum: int = 1
    clip: float = 1.0
    seq_len: int = 256
    text_field: str = "text"
    seed: int = 0
    save_every: int = 0  # 0: checkpoint only when interrupted
    resume: bool = False
    force: bool = False
    lora_rank: int = 8
    compare_source: bool = True


@dataclass
class FinetuneResult:
    out: str
    steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    source_eval: dict | None = None
    lambda_trajectory: dict[str, list[float]] = field(default_factory=dict)
    kernel: str = "reference"
    stopped: str = "completed"
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    is_main_process: bool = True

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("losses")
        d.pop("is_main_process")
        d["final_loss"] = self.losses[-1] if self.losses else None
        d["lambda_trajectory"] = {k: v[-1] for k, v in self.lambda_trajectory.items()}  # final λ per layer
        return d


Progress = Callable[[dict], None]


def lr_at(step: int, opts: FinetuneOptions) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    t = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def global_batch_indices(step: int, micro: int, n_blocks: int, global_micro_batch: int, grad_accum: int, seed: int) -> Tensor:
    """Block indices of one global micro-batch: a seeded permutation per epoch, a pure function of the step."""
    first = (step * grad_accum + micro) * global_micro_batch
    positions = torch.arange(first, first + global_micro_batch)
    out = torch.empty_like(positions)
    for epoch in positions.div(n_blocks, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        sel = positions.div(n_blocks, rounding_mode="floor") == epoch
        out[sel] = perm[positions[sel] % n_blocks]
    return out


def _select_trainable(model: nn.Module, mode: str, lora_rank: int) -> nn.Module:
    """Freeze what does not train.  IBNorm λ always becomes learnable; a model without IBNorm
    (the baseline fine-tune of a source model) trains its original norms in ``norms`` mode."""
    from .surgery import find_norms

    for m in model.modules():
        if isinstance(m, IBNormBase) and not m.lam_is_learnable:
            m.set_lambda(m.lam.detach(), learnable=True)
    norms = [m for m in model.modules() if isinstance(m, IBNormBase)] or [s.module for s in find_norms(model)[0]]
    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear", lora_dropout=0.0))
    for m in norms:
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
    return model


def _lambda_means(model: nn.Module) -> dict[str, float]:
    return {n: float(m.effective_lam.float().mean()) for n, m in model.named_modules() if isinstance(m, IBNormBase)}


@dataclass
class _Examples:
    """Token blocks (labels None: next-token prediction) or images with class labels."""

    inputs: Tensor
    labels: Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, idx) -> "_Examples":
        return _Examples(self.inputs[idx], None if self.labels is None else self.labels[idx])


def _loss(model: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
    if y is None:
        return model(input_ids=x, labels=x).loss
    return nn.functional.cross_entropy(model(x).float(), y)


@torch.no_grad()
def _eval_loss(model: nn.Module, data: _Examples, batch_size: int, device) -> dict:
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    for i in range(0, len(data), batch_size):
        x = data.inputs[i : i + batch_size].to(device)
        if data.labels is None:
            n = x.numel() - x.shape[0]  # predicted tokens
            total += float(_loss(model, x, None)) * n
        else:
            y = data.labels[i : i + batch_size].to(device)
            logits = model(x).float()
            n = len(y)
            total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        count += n
    model.train(was_training)
    nll = total / max(count, 1)
    if data.labels is None:
        return {"loss": nll, "perplexity": math.exp(nll), "tokens": count}
    return {"loss": nll, "accuracy": correct / max(count, 1), "images": count}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _save_checkpoint(dirpath: Path, step: int, model: nn.Module, optimizer, result: FinetuneResult, opts: FinetuneOptions) -> Path:
    """Everything ``resume`` needs, written atomically (a half-written checkpoint never appears)."""
    from safetensors.torch import save_file

    target = dirpath / f"step-{step:07d}"
    with atomic_directory(target, force=True) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(_dedup(state), str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "trainer_state.pt")
        write_json_atomic(tmp / "progress.json", {"step": step, "losses": result.losses, "evals": result.evals,
                                                  "lambda_trajectory": result.lambda_trajectory, "options": asdict(opts)})
    for old in sorted(dirpath.glob("step-*"))[:-2]:  # keep the two newest
        shutil.rmtree(old, ignore_errors=True)
    return target


def _dedup(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses shared storage (tied embeddings): keep one name per storage."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def latest_checkpoint(dirpath: Path) -> Path | None:
    found = sorted(dirpath.glob("step-*")) if dirpath.exists() else []
    return found[-1] if found else None


def finetune(path: str, opts: FinetuneOptions, progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune the converted model at ``path``; writes ``opts.out`` in the format ``convert`` writes."""
    from accelerate import Accelerator

    from .kernels.dispatch import describe

    if opts.train not in TRAIN_MODES:
        raise IBNormError(f"unknown --train {opts.train!r}; choose one of {', '.join(TRAIN_MODES)}")
    if opts.steps < 1 or opts.batch_size < 1 or opts.grad_accum < 1:
        raise IBNormError("--steps, --batch-size and --grad-accum must be ≥ 1")
    out = Path(opts.out or f"{path.rstrip('/')}-ft")
    ckpt_dir = Path(f"{out}{CHECKPOINT_DIR_SUFFIX}")
    if out.exists() and not opts.force:
        raise IBNormError(f"{out} already exists; pass --force to replace it")
    # Validate the data before any model work.
    images = is_image_folder(opts.data)
    if images:
        folders = (image_folder(opts.data), image_folder(opts.eval_data) if opts.eval_data else None)
    else:
        texts = read_texts(opts.data, opts.text_field)
        eval_texts = read_texts(opts.eval_data, opts.text_field) if opts.eval_data else None

    progress = progress or (lambda _: None)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if torch.cuda.is_available() else "no")
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)

    loaded = open_model(path)
    manifest = loaded.info.get("manifest")  # None: a source model, fine-tuned as the baseline
    if images:
        if loaded.task != "image-classifier":
            raise IBNormError(f"{opts.data} is an image folder, but {path} is not an image classifier")
        blocks, eval_blocks = _image_examples(loaded.model, folders, opts)
    else:
        if loaded.family != "hf" or loaded.task != "causal-lm":
            raise IBNormError(f"{path}: text fine-tuning needs a causal language model (an `ibnorm convert` output, or its source)")
        if loaded.tokenizer is None:
            raise IBNormError(f"{path} has no tokenizer files")
        blocks = _Examples(token_blocks(loaded.tokenizer, texts, opts.seq_len))
        if eval_texts is not None:
            eval_blocks = _Examples(token_blocks(loaded.tokenizer, eval_texts, opts.seq_len, opts.eval_blocks))
        else:
            n_eval = max(1, len(blocks) // 10)
            if len(blocks) - n_eval < 1:
                raise IBNormError("not enough training data for a held-out split: pass --eval-data")
            blocks, eval_blocks = blocks.take(slice(0, -n_eval)), blocks.take(slice(-n_eval, len(blocks)))
            eval_blocks = eval_blocks.take(slice(0, opts.eval_blocks))
    world = accelerator.num_processes
    global_micro = opts.batch_size * world

    model = _select_trainable(loaded.model, opts.train, opts.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    result = FinetuneResult(str(out), opts.steps, kernel=describe() if torch.cuda.is_available() else "reference (CPU)",
                            is_main_process=accelerator.is_main_process)

    start = 0
    if opts.resume:
        ckpt = latest_checkpoint(ckpt_dir)
        if ckpt is None:
            raise IBNormError(f"--resume: no checkpoint in {ckpt_dir}")
        from safetensors.torch import load_file

        unwrapped.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
        if hasattr(unwrapped, "tie_weights"):
            unwrapped.tie_weights()
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        prog = json.loads((ckpt / "progress.json").read_text())
        start = prog["step"]
        result.losses, result.evals, result.lambda_trajectory = prog["losses"], prog["evals"], prog["lambda_trajectory"]

    device = accelerator.device
    if opts.compare_source and manifest is not None and not images and accelerator.is_main_process and not opts.resume:
        result.source_eval = _source_eval(manifest, eval_blocks, opts)
    if start == 0:
        result.evals.append({"step": 0, **_eval_loss(model, eval_blocks, opts.batch_size, device)})
        for name, value in _lambda_means(unwrapped).items():
            result.lambda_trajectory.setdefault(name, []).append(value)
    progress({"event": "start", "kernel": result.kernel, "step": start, "steps": opts.steps, "processes": world,
              "eval": result.evals[-1] if result.evals else None, "source_eval": result.source_eval})

    model.train()
    t0 = time.perf_counter()
    tokens = 0
    step = start
    try:
        for step in range(start, opts.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, opts)
            step_loss = torch.zeros((), device=device)
            for micro in range(opts.grad_accum):
                idx = global_batch_indices(step, micro, len(blocks), global_micro, opts.grad_accum, opts.seed)
                local = idx[accelerator.process_index :: world]
                batch = blocks.take(local)
                x = batch.inputs.to(device)
                y = None if batch.labels is None else batch.labels.to(device)
                sync = micro == opts.grad_accum - 1
                ctx = accelerator.no_sync(model) if not sync and world > 1 else _null()
                with ctx, accelerator.autocast():
                    loss = _loss(model, x, y)
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
            for name, value in _lambda_means(unwrapped).items():
                result.lambda_trajectory.setdefault(name, []).append(value)
            done = step + 1
            record = {"event": "step", "step": done, "steps": opts.steps, "loss": loss_value, "lr": lr_at(step, opts),
                      "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9)}
            if opts.eval_every and done % opts.eval_every == 0 and done != opts.steps:
                result.evals.append({"step": done, **_eval_loss(model, eval_blocks, opts.batch_size, device)})
                record["eval"] = result.evals[-1]
            progress(record)
            if opts.save_every and done % opts.save_every == 0 and accelerator.is_main_process:
                _save_checkpoint(ckpt_dir, done, unwrapped, optimizer, result, opts)
    except KeyboardInterrupt:
        result.stopped = "interrupted"
        if accelerator.is_main_process and result.losses:
            saved = _save_checkpoint(ckpt_dir, len(result.losses), unwrapped, optimizer, result, opts)
            progress({"event": "interrupted", "checkpoint": str(saved)})
        raise
    result.evals.append({"step": opts.steps, **_eval_loss(model, eval_blocks, opts.batch_size, device)})
    result.seconds = time.perf_counter() - t0
    result.tokens_per_second = tokens / max(result.seconds, 1e-9)
    if accelerator.is_main_process:
        _write_output(unwrapped, loaded, manifest, out, opts, result)
    accelerator.wait_for_everyone()
    return result


def _image_examples(model: nn.Module, folders, opts: FinetuneOptions) -> tuple[_Examples, _Examples]:
    """Images with timm's evaluation transform (deterministic); a seeded 10% split when no --eval-data."""
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    x, y = load_images(folders[0], transform)
    train = _Examples(x, y)
    if folders[1] is not None:
        ex, ey = load_images(folders[1], transform)
        return train, _Examples(ex, ey)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(opts.seed))
    n_eval = max(1, len(x) // 10)
    if len(x) - n_eval < 1:
        raise IBNormError("not enough images for a held-out split: pass --eval-data")
    return train.take(perm[n_eval:]), train.take(perm[:n_eval])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _source_eval(manifest: dict, eval_blocks: Tensor, opts: FinetuneOptions) -> dict | None:
    """The source model's figures on the same held-out blocks, when the manifest names a loadable source."""
    from .io.sources import load_source

    try:
        src = load_source(manifest["source"]["resolved"])
    except Exception:
        return None
    return _eval_loss(src.model, eval_blocks, opts.batch_size, "cpu")


def _finetune_record(opts: FinetuneOptions, result: FinetuneResult) -> dict:
    final = result.evals[-1]
    return {
        "data": opts.data, "eval_data": opts.eval_data or "held-out 10% of --data", "steps": opts.steps, "train": opts.train,
        "lr": opts.lr, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum, "seq_len": opts.seq_len, "seed": opts.seed,
        "final": {k: v for k, v in final.items() if k in ("loss", "perplexity", "accuracy")},
        "before": result.evals[0] if result.evals else None, "source": result.source_eval, "kernel": result.kernel,
    }


def _metrics_files(result: FinetuneResult) -> dict[str, bytes]:
    from .plot import loss_curve_png

    metrics = "".join(json.dumps({"step": i + 1, "loss": l}) + "\n" for i, l in enumerate(result.losses))
    metrics += "".join(json.dumps({"eval": e}) + "\n" for e in result.evals)
    return {"metrics.jsonl": metrics.encode(), "loss_curve.png": loss_curve_png(result.losses, result.evals)}


def _write_output(model: nn.Module, loaded, manifest: dict | None, out: Path, opts: FinetuneOptions, result: FinetuneResult) -> None:
    if opts.train == "lora":
        model = model.merge_and_unload()
    if manifest is None:  # baseline: the model in its own format plus the fine-tune record
        with atomic_directory(out, opts.force) as tmp:
            if loaded.family == "hf":
                model.save_pretrained(tmp)
                loaded.tokenizer.save_pretrained(tmp)
            else:
                from safetensors.torch import save_model

                save_model(model, str(tmp / "model.safetensors"))
            write_json_atomic(tmp / "ibnorm_finetune.json", {"source": loaded.source, "finetune": _finetune_record(opts, result)})
            for name, data in _metrics_files(result).items():
                (tmp / name).write_bytes(data)
        return
    for m in model.modules():  # saved and reported λ is the effective one
        if isinstance(m, IBNormBase):
            m.lam.data.clamp_(min=0.0)
    manifest = json.loads(json.dumps(manifest))  # a copy
    manifest["finetune"] = _finetune_record(opts, result)
    final = result.evals[-1]
    for layer in manifest["layers"]:
        lam = model.get_submodule(layer["name"]).effective_lam.float().reshape(-1)
        layer.update(lam_mean=float(lam.mean()), lam_min=float(lam.min()), lam_max=float(lam.max()),
                     frac_lam_ge_0_1=float((lam >= 0.1).float().mean()), frac_lam_zero=float((lam == 0).float().mean()))
    metric = "perplexity" if "perplexity" in final else "accuracy"
    save_converted(model, out, manifest, family=loaded.family, tokenizer=loaded.tokenizer, hf_dir=loaded.hf_dir,
                   timm_name=loaded.timm_name, force=opts.force,
                   model_card=f"# Fine-tuned IBNorm model\n\n{opts.steps} steps ({opts.train}) on `{opts.data}`: "
                              f"held-out {metric} {result.evals[0][metric]:.4g} → {final[metric]:.4g}.\n",
                   extra_files=_metrics_files(result))
