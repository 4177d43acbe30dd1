"""One study run: build, train and evaluate a model.  A pure function of its configuration (resumable
from a mid-run checkpoint with the same result)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import IBNormBase, project_lambdas
from . import checkpoint as ckpt
from .data import DIGITS, eval_windows, images, text_splits, train_windows
from .models import build_model
from .normalizers import apply_normalizer

LOWER_IS_BETTER = {"ppl"}


def metric_of(task: dict) -> str:
    return "ppl" if task["kind"] == "lm" else "accuracy"


def _param_groups(model: nn.Module, wd: float, lam_lr_mult: float = 1.0) -> list[dict]:
    """The usual recipe: decay matrices and kernels only; norm γ/β, DyT α and biases are not decayed.

    Learnable λ is its own group at ``lam_lr_mult`` × the base learning rate (presets.py says why).
    """
    lams = {id(m.lam) for m in model.modules() if isinstance(m, IBNormBase) and m.lam_is_learnable}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in lams]
    rest = [p for p in params if p.dim() < 2 and id(p) not in lams]
    groups = [{"params": decay, "weight_decay": wd, "lr_mult": 1.0}, {"params": rest, "weight_decay": 0.0, "lr_mult": 1.0}]
    lam = [p for p in params if id(p) in lams]
    return groups + ([{"params": lam, "weight_decay": 0.0, "lr_mult": lam_lr_mult}] if lam else [])


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


class _Task:
    """Batches, loss and evaluation of one task kind."""

    def __init__(self, task: dict, seed: int, device: torch.device) -> None:
        self.task, self.device = task, device
        self.g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        if task["kind"] == "lm":
            splits = text_splits(task.get("data", "builtin:pydoc"), task.get("tokenizer"))
            self.train_ids = splits.train
            n, seq = task.get("eval_windows"), task["seq_len"]
            self.val, self.test = eval_windows(splits.val, seq, n), eval_windows(splits.test, seq, n)
            # the curve (every eval_every steps) on a fixed sample of validation windows; the final
            # validation and test evaluations on all of ``eval_windows``
            self.curve = eval_windows(splits.val, seq, task.get("curve_windows", 64))
        else:
            s = images(task.get("data", DIGITS), task.get("image_size", 32))
            self.train_xy, self.val, self.test = s.train, s.val, s.test
            self.curve = self.val

    def batch(self, size: int) -> tuple[Tensor, Tensor]:
        if self.task["kind"] == "lm":
            w = train_windows(self.train_ids, self.task["seq_len"], size, self.g)
            return w[:, :-1].to(self.device), w[:, 1:].to(self.device)
        idx = torch.randint(0, len(self.train_xy[0]), (size,), generator=self.g)
        return self.train_xy[0][idx].to(self.device), self.train_xy[1][idx].to(self.device)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.task["kind"] == "lm":
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        return F.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def per_example(self, model: nn.Module, data) -> tuple[Tensor, Tensor | None]:
        """Loss per example (a window's mean token loss, an image's loss) and, for images, correctness."""
        model.eval()
        try:
            if self.task["kind"] == "lm":
                out = []
                for w in data.split(64):
                    logits = model(input_ids=w[:, :-1].to(self.device)).logits.float()
                    tok = F.cross_entropy(logits.transpose(1, 2), w[:, 1:].to(self.device), reduction="none")
                    out.append(tok.mean(1).cpu())
                return torch.cat(out).double(), None
            logits = model(data[0].to(self.device)).float()
            y = data[1].to(self.device)
            return F.cross_entropy(logits, y, reduction="none").cpu().double(), (logits.argmax(-1) == y).cpu()
        finally:
            model.train()

    def evaluate(self, model: nn.Module, split: str, examples: bool = False) -> dict:
        """Mean loss and the task metric on ``split`` (val, test, or curve: the fixed validation sample);
        ``examples``: also each example's loss (5 decimals) and, for images, correctness as a 0/1 string."""
        losses, correct = self.per_example(model, {"val": self.val, "test": self.test, "curve": self.curve}[split])
        nll = float(losses.mean())
        out = {"loss": nll, "ppl": math.exp(min(nll, 50.0))} if correct is None else {"loss": nll, "accuracy": float(correct.double().mean())}
        if examples:
            out["examples"] = {"loss": [round(float(v), 5) for v in losses]}
            if correct is not None:
                out["examples"]["correct"] = "".join("1" if c else "0" for c in correct.tolist())
        return out


def _saved_bytes(fn: Callable[[], Tensor]) -> tuple[Tensor, int]:
    """Run ``fn`` and count the bytes autograd saves for backward (activation memory of a step)."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def _mean_lambda(model: nn.Module) -> float | None:
    lams = [float(m.effective_lam.mean()) for m in model.modules() if isinstance(m, IBNormBase)]
    return sum(lams) / len(lams) if lams else None


def run_one(cfg: dict, device: str | None = None, checkpoint: Path | None = None, deadline: float | None = None) -> dict | None:
    """Train ``cfg['task']`` with ``cfg['normalizer']`` at (lr, wd, λ, seed); return the run record.

    ``checkpoint``: a directory to resume from and to save to every ``task['checkpoint_every']`` steps;
    ``deadline`` (``time.time()``): stop there, save the checkpoint and return None.
    """
    task, seed = cfg["task"], cfg["seed"]
    dev = torch.device(device or cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model = apply_normalizer(build_model(task), cfg["normalizer"], cfg["lam"]).to(dev)
    world, rank = _dist_info()
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    data = _Task(task, seed, dev)
    steps, warmup = task["steps"], max(1, int(task.get("warmup_frac", 0.1) * task["steps"]))
    betas = (0.9, 0.95) if task["kind"] == "lm" else (0.9, 0.999)
    opt = torch.optim.AdamW(_param_groups(model, cfg["wd"], task.get("lam_lr_mult", 1.0)), lr=cfg["lr"], betas=betas)
    prog = (checkpoint and ckpt.restore(checkpoint, cfg, model, opt, data.g)) or ckpt.Progress()
    diverged, every, start = False, task.get("checkpoint_every", 0), prog.step
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for step in range(start, steps):
        if checkpoint is not None:
            stop = _past(deadline, world, dev)
            if stop or (every and step % every == 0 and step != start):
                if rank == 0:
                    ckpt.save(checkpoint, cfg, model, opt, data.g, prog)
                if stop:
                    return None
        if not _train_step(cfg, task, net, model, opt, data, step, steps, warmup, prog, (world, rank), dev):
            diverged = True
            break
        if (step + 1) % task["eval_every"] == 0 or step + 1 == steps:
            prog.evals.append({"step": step + 1, **data.evaluate(model, "curve")})
    if checkpoint is not None and rank == 0:
        ckpt.remove(checkpoint)
    return _record(cfg, model, data, prog, diverged, dev, world)


def _past(deadline: float | None, world: int, dev: torch.device) -> bool:
    """Whether the deadline has passed — agreed by every process (they must stop at the same step)."""
    if deadline is None:
        return False
    flag = torch.tensor([float(time.time() >= deadline)], device=dev if world > 1 else "cpu")
    if world > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _train_step(cfg: dict, task: dict, net: nn.Module, model: nn.Module, opt, data: "_Task", step: int, steps: int,
                warmup: int, prog: ckpt.Progress, dist: tuple[int, int], dev: torch.device) -> bool:
    """One optimizer step; False when the loss is not finite (diverged)."""
    world, rank = dist
    x, y = data.batch(task["batch_size"])
    x, y = x[rank::world], y[rank::world]  # each process takes its share of one global batch
    for group in opt.param_groups:
        group["lr"] = cfg["lr"] * group["lr_mult"] * lr_factor(step, steps, warmup)
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):  # bf16 on GPU, fp32 on CPU
        if step == 0:
            loss, prog.act_bytes = _saved_bytes(lambda: data.loss(net, x, y))
        else:
            loss = data.loss(net, x, y)
    if not torch.isfinite(loss):
        return False
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), task.get("clip", 1.0))
    opt.step()
    project_lambdas(model)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    prog.train_s += time.perf_counter() - t0 if step > 0 else 0.0  # step 0 includes one-off warm-up costs
    prog.losses.append(float(loss.detach()))
    prog.step = step + 1
    return True


def _record(cfg: dict, model: nn.Module, data: "_Task", prog: ckpt.Progress, diverged: bool, dev: torch.device,
            world: int) -> dict:
    task, metric = cfg["task"], metric_of(cfg["task"])
    final_val = data.evaluate(model, "val") if not diverged else None
    final_test = data.evaluate(model, "test", examples=True) if not diverged else None
    return {
        "config": cfg, "task": task["name"], "normalizer": cfg["normalizer"], "lam": cfg["lam"], "lr": cfg["lr"],
        "wd": cfg["wd"], "seed": cfg["seed"], "metric": metric, "diverged": diverged,
        "val": None if diverged else final_val[metric], "value": None if diverged else final_test[metric],
        "val_loss": None if diverged else final_val["loss"], "test_loss": None if diverged else final_test["loss"],
        "test_examples": None if diverged else final_test.pop("examples"),
        "losses": prog.losses, "evals": prog.evals, "mean_lambda": _mean_lambda(model),
        "params": sum(p.numel() for p in model.parameters()),
        "s_per_step": prog.train_s / max(1, len(prog.losses) - 1), "activation_mib": prog.act_bytes / 2**20,
        "peak_mem_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        "device": str(dev), "processes": world, "threads": torch.get_num_threads(),
        "information": None if diverged else _information(task, model, data),
    }


def _information(task: dict, model: nn.Module, data: "_Task") -> dict | None:
    """The trained model's information plane (``ibnorm.mi.information_snapshot``: I(X;T), I(T;Y) per norm
    layer) on the first ``task['information']['windows']`` validation-sample windows; LLaMA tasks only."""
    spec = task.get("information")
    if not spec or task["kind"] != "lm":
        return None
    from ..mi import information_snapshot

    ids = data.curve[: spec.get("windows", 16)].to(next(model.parameters()).device)
    snap = information_snapshot(model, ids, dims=spec.get("dims", 4))
    return {name: {k: round(float(v), 5) for k, v in vals.items()} for name, vals in snap.items()}


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def init_distributed() -> None:
    """Join the process group torchrun / accelerate launch set up (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
