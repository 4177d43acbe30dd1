"""The memory plan of a fine-tune, per rank, from config.json and safetensors headers (no weights
loaded: the model is built on the meta device), and the choice of how to spread it over the ranks.

Bytes per rank, for shard mode ``none``/``ddp`` (every rank holds the whole model) or ``fsdp``
(``fully_shard``: each rank holds 1/N of every parameter, rounded up as FSDP2 pads dim 0):

* parameters: every parameter in the dtype it is stored in (safetensors header, else the config's
  dtype); under fsdp the trained ones are float32 master weights (FSDP2 keeps one dtype per group);
  fsdp adds the largest decoder block all-gathered in the compute dtype, twice (current + prefetch);
* gradients: one per trained element, in the trained parameter's dtype;
* optimizer: AdamW's two moments per trained element, in the trained parameter's dtype;
* activations: an estimate for ``batch_size`` sequences of ``seq_len`` tokens without activation
  checkpointing: each decoder layer keeps about ``12·hidden + 4·intermediate`` values per token
  (inputs of the norms, q/k/v/o, the MLP's gate, up and product), plus float32 logits and their
  gradient (``2·vocab`` per token).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import IBNormError
from ..validate import seq_len_for
from .options import TRAIN_SEQ_LEN, FinetuneOptions

SHARD_MODES = ("none", "ddp", "fsdp", "auto")
_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}
_SAVED_PER_TOKEN = (12, 4)  # activations kept per token and layer: 12·hidden + 4·intermediate


@dataclass
class MemoryPlan:
    world_size: int
    shard: str
    train: str
    per_rank_bytes: dict[str, int]
    device_bytes: int | None
    device: str
    fits: bool
    trainable: int  # trained elements (whole model)
    total_parameters: int  # elements (whole model, tied ones once)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class PlanDoesNotFit(IBNormError):
    """The run would not fit each rank's memory; carries the plan for the table."""

    def __init__(self, plan: MemoryPlan) -> None:
        super().__init__(f"this run needs {size_text(plan.per_rank_bytes['total'])} per rank ({plan.shard}, "
                         f"{plan.world_size} rank(s)), more than the {size_text(plan.device_bytes or 0)} of {plan.device}; "
                         f"use more ranks, --shard fsdp, "
                         f"--train lora/norms or a smaller --batch-size")
        self.plan = plan


def world_size_here() -> int:
    """The number of ranks of this launch: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_memory(gpu_memory: int | None, world: int) -> tuple[int, str]:
    """Bytes one rank may use: ``--gpu-memory``, else the smallest GPU present, else host memory / local ranks."""
    if gpu_memory:
        return gpu_memory, "--gpu-memory"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return min(torch.cuda.get_device_properties(i).total_memory for i in range(n)), f"{n} × {torch.cuda.get_device_name(0)}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(1, local), "host memory (no GPU)"


def _meta_model(path: Path) -> tuple[nn.Module, dict[str, str]]:
    """The model ``finetune`` would train, on the meta device, and the stored dtype of each tensor."""
    from ..io.manifest import MANIFEST, read_manifest
    from ..validate import read_config, skeleton_of

    dtypes: dict[str, str] = {}
    if any(path.glob("*.safetensors")):
        from ..io.safetensors_index import TensorIndex

        index = TensorIndex.open(path)
        dtypes = {name: info.dtype for name, info in index.tensors.items()}
        index.close()
    if (path / MANIFEST).is_file():
        from ..loading import layers_from_manifest, skeleton
        from ..surgery import set_submodule

        manifest = read_manifest(path)
        model = skeleton(path, manifest)
        for name, module in layers_from_manifest(model, manifest).items():
            set_submodule(model, name, module)  # small: on the CPU
    else:
        model = skeleton_of(read_config(path), causal=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # as loading does: tied tensors count once
    return model, dtypes


def _config_dtype(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {torch.bfloat16: "BF16", torch.float16: "F16", "bfloat16": "BF16", "float16": "F16"}.get(dtype, "F32")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: modules of the classes the model names in ``_no_split_modules``."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _per_rank(shape: tuple[int, ...], world: int, sharded: bool) -> int:
    """Elements one rank holds of a tensor: FSDP2 shards dim 0, padded to a multiple of the world size."""
    n = math.prod(shape)
    if not sharded or not shape:
        return n
    return math.ceil(shape[0] / world) * (n // shape[0] if shape[0] else 0)


def _activations(config, batch: int, seq: int, act_bytes: int) -> int:
    h = getattr(config, "hidden_size", 0) or 0
    inter = getattr(config, "intermediate_size", None) or 4 * h
    layers = getattr(config, "num_hidden_layers", 0) or 0
    vocab = getattr(config, "vocab_size", 0) or 0
    per_token = layers * (_SAVED_PER_TOKEN[0] * h + _SAVED_PER_TOKEN[1] * inter) * act_bytes + 2 * vocab * 4
    return batch * seq * per_token


def memory_plan(path: str, opts: FinetuneOptions, shard: str, world_size: int | None = None,
                gpu_memory: int | None = None) -> MemoryPlan:
    """Per-rank memory of fine-tuning ``path`` with ``opts`` in shard mode ``shard`` (``auto``: chosen)."""
    from .trainable import select_trainable

    world = world_size or world_size_here()
    model, dtypes = _meta_model(Path(path))
    model = select_trainable(model, opts.train, opts.lora_rank)
    device_bytes, device = device_memory(gpu_memory, world)
    if shard == "auto":
        shard = choose_shard(path, opts, world, gpu_memory)
    sharded = shard == "fsdp"
    default = _config_dtype(model)
    params = grads = optim = total = trainable = 0
    for name, p in model.named_parameters():
        stored = dtypes.get(name.removeprefix("base_model.model."), default)
        nbytes = 4 if (p.requires_grad and sharded) else _BYTES.get(stored, 4)
        n = _per_rank(tuple(p.shape), world, sharded)
        params += n * nbytes
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            grads += n * nbytes
            optim += 2 * n * nbytes
    cuda = torch.cuda.is_available() or gpu_memory is not None
    compute_bytes = 2 if cuda else 4
    config = getattr(model, "config", None)
    seq_len = seq_len_for(opts.seq_len, config, TRAIN_SEQ_LEN)
    per_rank = {"parameters": params, "gradients": grads, "optimizer": optim,
                "activations": _activations(config, opts.batch_size, seq_len, compute_bytes)}
    if sharded:
        largest = max((sum(p.numel() for p in b.parameters()) for b in decoder_blocks(model)), default=0)
        per_rank["gathered_blocks"] = 2 * largest * compute_bytes
    per_rank["total"] = sum(per_rank.values())
    notes = [f"activations: an estimate for batch {opts.batch_size} × {seq_len} tokens per rank, without checkpointing"]
    return MemoryPlan(world, shard, opts.train, per_rank, device_bytes, device, per_rank["total"] <= device_bytes,
                      trainable, total, notes)


def plan_for(path: str, opts: FinetuneOptions, world_size: int | None = None) -> MemoryPlan:
    """The plan ``ibnorm finetune --plan`` shows, the options checked first."""
    from ..validate import check_range
    from .options import TRAIN_MODES

    world = int(check_range("--world-size", world_size or world_size_here(), low=1, integer=True))
    if opts.train not in TRAIN_MODES:
        raise IBNormError(f"unknown --train {opts.train!r}; choose one of {', '.join(TRAIN_MODES)}")
    if not (Path(path) / "config.json").is_file():
        raise IBNormError(f"--plan needs a model directory with config.json: {path}")
    return memory_plan(path, opts, resolve_shard(opts.shard, world), world, opts.gpu_memory)


def choose_shard(path: str, opts: FinetuneOptions, world: int, gpu_memory: int | None = None) -> str:
    """How a run spreads over ``world`` ranks -- the one place this is decided: one rank runs unsharded;
    several replicate the model (DDP) when it fits each rank, else shard it (FSDP2)."""
    if world == 1:
        return "none"
    return "ddp" if memory_plan(path, opts, "ddp", world, gpu_memory).fits else "fsdp"


def resolve_shard(requested: str, world: int) -> str:
    """Check ``--shard`` against the launch (the ``auto`` choice needs the plan: ``choose_shard``)."""
    if requested not in SHARD_MODES:
        raise IBNormError(f"unknown --shard {requested!r}; choose one of {', '.join(SHARD_MODES)}")
    if requested == "ddp" and world == 1:
        raise IBNormError("--shard ddp needs several processes: launch with torchrun --nproc_per_node N")
    if requested == "none" and world > 1:
        raise IBNormError(f"--shard none runs one process, but this launch has {world}: use --shard ddp or fsdp")
    return requested


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def plan_rows(plan: MemoryPlan) -> list[tuple[str, str]]:
    """(what, bytes per rank) rows of the plan table."""
    rows = [(k.replace("_", " "), size_text(v)) for k, v in plan.per_rank_bytes.items()]
    rows.append((f"available ({plan.device})", size_text(plan.device_bytes or 0)))
    return rows
