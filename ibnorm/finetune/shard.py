"""FSDP2 (``fully_shard``) for fine-tuning under torchrun: the wrapping, and the few calls of the
training loop that differ from Accelerate's (same names, so the loop has one body).

Wrapping order (torchtitan's and axolotl's per-norm pattern): every IBNorm (and every LoRA adapter)
first, with its own ``MixedPrecisionPolicy(param_dtype=float32)``, so γ, β and λ stay float32; then
every decoder block; then the root.  On a GPU the blocks and the root compute in bfloat16 and
reduce gradients in float32; on the CPU (gloo) everything is float32.  Trained parameters are
float32 master weights (FSDP2 needs one dtype per group; frozen ones keep their stored dtype).

``fully_shard`` refuses 0-dim parameters (a scalar λ): those stay replicated (``ignored_params``),
and their gradients are averaged here with one all-reduce per step.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import IBNormError
from ..layers import IBNormBase
from .plan import decoder_blocks


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_value(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly sharded) value; collective for a DTensor."""
    return t.full_tensor() if _is_dtensor(t) else t


def _adapters(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA adapters (the Linear layers in lora_A and lora_B), wrapped on their own like the norms."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-2:-1] in (["lora_A"], ["lora_B"])]


class FSDPEngine:
    """Process group, device mesh and the loop's distributed calls for ``--shard fsdp``."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.own_group = False  # a group of one made here is destroyed by close(); torchrun's lives with the process
        if not dist.is_initialized():
            if "WORLD_SIZE" in os.environ:  # torchrun
                dist.init_process_group("nccl" if self.cuda else "gloo")
            else:  # one process: a group of one, so the same code runs
                dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
                self.own_group = True
        self.num_processes, self.process_index = dist.get_world_size(), dist.get_rank()
        self.is_main_process = self.process_index == 0
        if self.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.num_processes,))
        self.replicated: list[nn.Parameter] = []
        self._sync = True

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` in place (norms and adapters, then blocks, then the root)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        low = torch.bfloat16 if self.cuda else None
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # float32 master weights
        self.replicated = [p for p in model.parameters() if p.dim() == 0]
        for p in self.replicated:  # fully_shard moves what it manages to the mesh's device, not these
            p.data = p.data.to(self.device)
        ignored = set(self.replicated)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=low)
        for m in [m for m in model.modules() if isinstance(m, IBNormBase)] + _adapters(model):
            fully_shard(m, mesh=self.mesh, mp_policy=fp32, ignored_params=ignored)
        mixed = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        blocks = decoder_blocks(model)
        if not blocks:
            raise IBNormError("--shard fsdp needs a model with decoder blocks (a transformers causal language model)")
        for block in blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=mixed, ignored_params=ignored)
        fully_shard(model, mesh=self.mesh, mp_policy=mixed, ignored_params=ignored)
        return model

    @contextmanager
    def no_sync(self, model: nn.Module):
        """Accumulate gradients locally on this micro-step (FSDP2 reduce-scatters on the last)."""
        model.set_requires_gradient_sync(False)
        self._sync = False
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
            self._sync = True

    def autocast(self):
        return nullcontext()  # the mixed-precision policies cast; no autocast on top

    def backward(self, loss: Tensor) -> None:
        loss.backward()
        if self._sync and self.num_processes > 1:
            for p in self.replicated:  # FSDP2 averages the sharded gradients; these are averaged here
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad.div_(self.num_processes)

    def reduce(self, t: Tensor, reduction: str = "mean") -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.num_processes if reduction == "mean" else t

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """Clip by the norm of all gradients (sharded ones through their DTensor norm)."""
        from torch.nn.utils import get_total_norm

        groups = [[p.grad for p in params if p.grad is not None and _is_dtensor(p.grad) == sharded] for sharded in (True, False)]
        norms = [full_value(get_total_norm(g)) if g else torch.zeros((), device=self.device) for g in groups]
        total = torch.stack([n.to(self.device) for n in norms]).norm()
        # torch's clip_grads_with_norm_ (foreach) leaves DTensor gradients unscaled here: scale each one,
        # by the coefficient it computes
        coefficient = min(1.0, max_norm / (float(total) + 1e-6))
        for g in groups[0] + groups[1]:
            g.mul_(coefficient)
        return total

    def wait_for_everyone(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state on rank 0's CPU (empty on the other ranks); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_for(params: list[nn.Parameter], opts) -> torch.optim.Optimizer:
    """AdamW; sharded (DTensor) and replicated parameters in separate groups (foreach needs one kind)."""
    sharded = [p for p in params if _is_dtensor(p)]
    plain = [p for p in params if not _is_dtensor(p)]
    groups = [{"params": g} for g in (sharded, plain) if g]
    return torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)
