"""Validation before work, in one place: options, sizes, finite values, disk space, weights vs architecture.

Every check raises an :class:`~ibnorm.errors.IBNormError` subclass whose message is one line naming
the option or tensor and what is wrong, so the CLI prints one ``error:`` line and exits non-zero
before any model is loaded or any file is written.  No torch import at module level (``inspect``
and option checks run without it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import NonFiniteError, OptionError, OutputError, OutputExistsError, SourceError, StateMismatchError

# λ far above this saturates every compression op (tanh(λz)/λ, log1p(λ|z|)/λ, …); 100 is already
# meaningless, larger values only come from typos (1e30) and overflow in float16.
LAM_MAX = 100.0
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
# Config fields that bound the sequence length (learned position tables index out of range beyond them).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
# Headroom kept free on the output's file system: metadata, side files, and the estimate's error.
DISK_MARGIN = 1.05
DISK_SLACK_BYTES = 64 * 2**20
# Parameter dtypes (safetensors names, and torch's, so callers can pass either).
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "float64", "float32", "float16", "bfloat16",
                 "torch.float64", "torch.float32", "torch.float16", "torch.bfloat16")


# ----------------------------------------------------------------------------- numbers


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise OptionError(f"{name} must be a finite number, got {value}")
    return value


def check_range(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, integer: bool = False) -> float:
    """``value`` as a finite number in [low, high] (or (low, high] with ``low_open``); one-line error otherwise."""
    v = _number(name, value)
    if integer and v != int(v):
        raise OptionError(f"{name} must be a whole number, got {value}")
    if low is not None and (v <= low if low_open else v < low):
        raise OptionError(f"{name} must be {'>' if low_open else '≥'} {_g(low)}, got {_g(v)}")
    if high is not None and v > high:
        raise OptionError(f"{name} must be ≤ {_g(high)}, got {_g(v)}")
    return int(v) if integer else v


def _g(v: float) -> str:
    return f"{v:g}"


def check_lam(lam: float | None) -> float | None:
    """``--lam``: None (calibrate) or a finite λ in [0, LAM_MAX]."""
    return None if lam is None else check_range("--lam", lam, low=0.0, high=LAM_MAX)


def check_tolerance(tolerance: float) -> float:
    """``--tolerance``: a relative squared error in (0, 1]."""
    return check_range("--tolerance", tolerance, low=0.0, high=1.0, low_open=True)


def check_budget(budget: float) -> float:
    """``--budget``: a KL (nats/token) or 1 − cosine, ≥ 0; ``inf`` means no end-to-end back-off."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget == math.inf:
        return math.inf
    return check_range("--budget", budget, low=0.0)


def check_calib_samples(n: int) -> int:
    return int(check_range("--calib-samples", n, low=1, integer=True))


def check_lr(lr: float) -> float:
    return check_range("--lr", lr, low=0.0, low_open=True)


def check_lora_rank(rank: int) -> int:
    return int(check_range("--lora-rank", rank, low=1, integer=True))


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover, from an HF config (object or dict)."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    for key in _POSITION_FIELDS:
        v = get(key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_seq_len(seq_len: int | None, config: Any = None, *, option: str = "--seq-len") -> int | None:
    """At least 2 tokens (one prediction needs a context and a target), at most the model's positions.
    None (not given: the model decides, see ``seq_len_for``) passes."""
    if seq_len is None:
        return None
    n = int(check_range(option, seq_len, low=2, integer=True))
    limit = max_positions(config) if config is not None else None
    if limit is not None and n > limit:
        raise OptionError(f"{option} {n} exceeds the model's {limit} positions")
    return n


def seq_len_for(seq_len: int | None, config: Any, default: int) -> int:
    """The sequence length to use: the one given (checked against the model), else ``default`` capped
    at the model's positions (a 256-position model gets 256 where the default is 512)."""
    if seq_len is not None:
        return int(check_seq_len(seq_len, config))
    limit = max_positions(config) if config is not None else None
    return default if limit is None else min(default, limit)


def parse_size(text: str | int) -> int:
    """A byte count: ``5GB``, ``500MB``, ``2GiB``, ``1.5 GiB``, ``4096``; SI and binary units, case-insensitive."""
    if isinstance(text, bool):
        raise OptionError(f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)")
    if isinstance(text, int):
        n = text
    else:
        m = _SIZE_RE.fullmatch(str(text))
        if not m or m.group(2).upper() not in SIZE_UNITS:
            raise OptionError(f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)")
        n = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if n < 1:
        raise OptionError(f"size {text!r} must be at least 1 byte")
    return n


def check_grouping(grouping: str, found: Iterable[str]) -> str:
    """``--grouping`` against the groupings of the norms found in the model (``NormSpec.grouping`` values).

    Row-wise norms (rms, layer) take rms/layer; batch and group norms keep their own grouping.
    """
    from .spec import ROW_GROUPINGS

    found = set(found)
    if grouping == "auto":
        return grouping
    bad = sorted(k for k in found if k != grouping and not (k in ROW_GROUPINGS and grouping in ROW_GROUPINGS))
    if bad:
        raise OptionError(f"--grouping/--variant {grouping} cannot replace this model's {'/'.join(bad)} norms "
                          f"(row-wise norms take rms or layer; batch and group norms keep their grouping; use --grouping auto)")
    return grouping


def check_weights_option(source: str, weights: str | None, random_weights: bool = False) -> None:
    """``--weights``/``--random-weights`` only mean something for ``timm:NAME`` sources."""
    if (weights is not None or random_weights) and not str(source).startswith("timm:"):
        opt = "--weights" if weights is not None else "--random-weights"
        raise OptionError(f"{opt} applies only to timm:NAME sources, not {source}")
    if weights is not None and random_weights:
        raise OptionError("--weights and --random-weights exclude each other")


_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    """``--device``: cpu, cuda or cuda:N, and a CUDA device must exist."""
    if not _DEVICE_RE.match(str(device)):
        raise OptionError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise OptionError(f"--device {device}: no such CUDA device on this machine")


@dataclass(frozen=True)
class ConvertChecks:
    """The convert options after validation (sizes parsed)."""

    lam: float | None
    tolerance: float
    budget: float
    calib_samples: int
    seq_len: int | None
    shard_size: int


def validate_convert_options(*, lam: float | None, tolerance: float, budget: float, calib_samples: int,
                             seq_len: int | None, shard_size: str | int, source: str = "", weights: str | None = None,
                             random_weights: bool = False, config: Any = None) -> ConvertChecks:
    """All option checks of ``convert`` that need no model: call before loading anything."""
    check_weights_option(source, weights, random_weights)
    return ConvertChecks(check_lam(lam), check_tolerance(tolerance), check_budget(budget),
                         check_calib_samples(calib_samples), check_seq_len(seq_len, config), parse_size(shard_size))


def validate_finetune_options(*, lr: float, lora_rank: int, seq_len: int | None, steps: int = 1, batch_size: int = 1,
                              grad_accum: int = 1, warmup: int = 0, weight_decay: float = 0.0, clip: float = 0.0,
                              config: Any = None) -> None:
    """All option checks of ``finetune`` that need no model (``config``: the model's, for --seq-len)."""
    check_lr(lr)
    check_lora_rank(lora_rank)
    check_seq_len(seq_len, config)
    for name, v in (("--steps", steps), ("--batch-size", batch_size), ("--grad-accum", grad_accum)):
        check_range(name, v, low=1, integer=True)
    check_range("--warmup", warmup, low=0, integer=True)
    check_range("--weight-decay", weight_decay, low=0.0)
    check_range("--clip", clip, low=0.0)


# ----------------------------------------------------------------------------- finite values


def check_finite(name: str, value: Any) -> None:
    """Refuse NaN/Inf in a number, a tensor, a numpy array, or a (nested) dict/list of them."""
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            check_finite(f"{name}.{k}", v)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(f"{name}[{i}]", v)
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise NonFiniteError(f"{name} is {value} (not finite)")
        return
    _check_finite_array(name, value)


def _check_finite_array(name: str, value: Any) -> None:
    if hasattr(value, "is_floating_point"):  # torch tensor: count on its device, no copy to numpy
        if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
            return
        bad = int((~value.isfinite()).sum())
        total = value.numel()
    elif hasattr(value, "dtype") and hasattr(value, "size"):  # numpy
        import numpy as np

        if value.dtype.kind not in "fc" or value.size == 0:
            return
        bad = int((~np.isfinite(value)).sum())
        total = int(value.size)
    else:
        return
    if bad:
        raise NonFiniteError(f"{name} has {bad} of {total} values NaN or infinite")


# ----------------------------------------------------------------------------- disk space


# ----------------------------------------------------------------------------- special files

_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_not_special(path: str | Path) -> None:
    """Refuse a FIFO, device or socket — the path itself, or an entry of the directory it names — before
    anything opens it: opening a FIFO blocks until a writer comes, a device streams forever.  Only
    ``stat`` is called, which never blocks."""
    p = Path(path)
    try:
        entries = [p, *sorted(p.iterdir())] if p.is_dir() else [p]
    except OSError:
        entries = [p]
    for entry in entries:
        try:
            mode = os.stat(entry).st_mode
        except OSError:  # missing or unreadable: the reader says so in its own words
            continue
        for is_kind, what in _SPECIAL_FILES:
            if is_kind(mode):
                raise SourceError(f"{entry} is {what}, not a regular file; ibnorm reads only files and directories")


def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def ensure_disk_space(out_dir: str | Path, needed_bytes: int) -> int:
    """Refuse early if ``out_dir``'s file system is read-only, not writable, or lacks ``needed_bytes``
    (plus margin).  Returns the free bytes.  ``out_dir`` need not exist yet."""
    where = _existing_ancestor(Path(out_dir))
    if not where.is_dir():
        raise OutputError(f"cannot write {out_dir}: {where} is not a directory")
    if not os.access(where, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out_dir}: {where} is not writable")
    try:
        st = os.statvfs(where)
        if st.f_flag & os.ST_RDONLY:
            raise OutputError(f"cannot write {out_dir}: {where} is on a read-only file system")
    except AttributeError:  # no statvfs (Windows): disk_usage below still measures
        pass
    free = shutil.disk_usage(where).free
    need = int(needed_bytes * DISK_MARGIN) + DISK_SLACK_BYTES
    if needed_bytes > 0 and free < need:
        raise OutputError(f"not enough disk space for {out_dir}: about {_gib(need)} needed, {_gib(free)} free on {where}")
    return free


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def estimate_output_bytes(tensor_bytes: int, lambda_elements: int = 0, side_bytes: int = 0) -> int:
    """Bytes a conversion writes: the weights (in their output dtype), one float32 λ per channel, side files."""
    return int(tensor_bytes) + 4 * int(lambda_elements) + int(side_bytes)


# ----------------------------------------------------------------------------- weights vs architecture


def check_state_matches(model_params: Mapping[str, tuple[int, ...]], tensors: Mapping[str, tuple[tuple[int, ...], str]],
                        tied: Iterable[str] = (), *, base_prefix: str | None = None, ignore_unexpected: Iterable[str] = (),
                        where: str = "the checkpoint") -> None:
    """Every parameter of the skeleton present with its shape, nothing left to random initialisation.

    ``model_params``: name → shape of the architecture's parameters (a meta-device skeleton's
    ``named_parameters()``); ``tensors``: name → (shape, dtype) in the weights; ``tied``: parameter
    names shared with another and stored once (``lm_head.weight``).  ``base_prefix``: the model's
    ``base_model_prefix`` (hub GPT-2 checkpoints store ``h.0…`` for ``transformer.h.0…``).  Tensors
    the architecture does not have are refused too (a config with fewer layers than the weights),
    except saved buffers, tied names and names matching a regex of ``ignore_unexpected``
    (transformers' ``_keys_to_ignore_on_load_unexpected``).
    """
    tied = set(tied)
    strip = f"{base_prefix}." if base_prefix else None

    def stored(name: str) -> str | None:
        if name in tensors:
            return name
        if strip and name.startswith(strip) and name[len(strip):] in tensors:
            return name[len(strip):]
        return None

    missing = sorted(n for n in model_params if stored(n) is None and n not in tied)
    if missing:
        raise StateMismatchError(f"{where} lacks {len(missing)} parameter(s) the config describes, e.g. {missing[0]!r} "
                                 f"(config and weights disagree)")
    used = set()
    for name, shape in model_params.items():
        key = stored(name)
        if key is None:
            continue
        used.add(key)
        if tuple(tensors[key][0]) != tuple(shape):
            raise StateMismatchError(f"{where}: {key!r} has shape {list(tensors[key][0])}, the config expects {list(shape)}")
        if tensors[key][1] not in _FLOAT_DTYPES:  # parameters are float; an integer one is a different tensor
            raise StateMismatchError(f"{where}: {key!r} is stored as {tensors[key][1]}, a parameter must be float")
    patterns = [re.compile(p) for p in ignore_unexpected]
    known = used | tied | ({f"{strip}{t}" for t in tied} if strip else set())
    extra = sorted(n for n in tensors if n not in known and (not strip or f"{strip}{n}" not in tied)
                   and not _is_buffer_like(n) and not any(p.search(n) for p in patterns))
    if extra:
        raise StateMismatchError(f"{where} holds {len(extra)} tensor(s) the config does not describe, e.g. {extra[0]!r}")


def tied_parameter_names(model: Any) -> set[str]:
    """Names of parameters tied to another and stored once: those sharing a tensor with an earlier one, and
    (on a meta-device skeleton, where nothing is tied yet) those transformers will tie for this config."""
    every = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    unique = {n for n, _ in model.named_parameters()}
    tied = {n for n in every if n not in unique}
    declared = getattr(model, "all_tied_weights_keys", None)  # transformers ≥ 5: {target: source}, config-aware
    if isinstance(declared, Mapping):
        tied.update(k for k in declared if k in unique)
    return tied


def _is_buffer_like(name: str) -> bool:
    # Saved buffers (BatchNorm statistics, rotary caches of old checkpoints) are not parameters.
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("running_mean", "running_var", "num_batches_tracked", "inv_freq", "masked_bias", "bias_buffer") or \
        name.endswith(".attn.bias")


def check_norm_dtype(name: str, dtype: str) -> None:
    """A norm's weight/bias/λ must be floating point (a U32 norm weight reads as 1e9)."""
    from .io.safetensors_index import require_float

    require_float(name, dtype)


# ----------------------------------------------------------------------------- HF checkpoints (config + weights)


def read_config(model_dir: str | Path) -> Any:
    """The transformers config of a model directory; a malformed ``config.json`` is one SourceError line."""
    from .errors import SourceError

    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{model_dir} is not a model directory (no config.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SourceError(f"{path} is corrupt (not UTF-8 JSON)") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type", ""), str):
        raise SourceError(f"{path} is corrupt (not a config object)")
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise SourceError(f"{path} is corrupt: architectures must be a list of class names")
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001  transformers raises many kinds for bad field values
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"{path} is not a valid config: {first}") from None


def skeleton_of(config: Any, causal: bool | None = None) -> Any:
    """The architecture a config describes, on the meta device (no memory, no random values).
    ``causal``: build the causal-LM class (default: when the config's architectures name one)."""
    import transformers
    from accelerate import init_empty_weights

    archs = getattr(config, "architectures", None) or []
    if causal is None:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        with init_empty_weights(include_buffers=False):
            return auto.from_config(config)
    except Exception as e:  # noqa: BLE001  an inconsistent config (heads not dividing the width, …)
        from .errors import SourceError

        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"the config describes no buildable model: {first}") from None


def check_hf_checkpoint(model_dir: str | Path, index: Any = None, norm_names: Iterable[str] | None = None) -> None:
    """Config and safetensors weights of an HF directory describe the same model, and its norm tensors are
    float and finite.  ``index``: an open :class:`~ibnorm.io.safetensors_index.TensorIndex` (opened here if
    None); ``norm_names``: the norm modules (default: modules whose class name contains "Norm")."""
    from .io.safetensors_index import TensorIndex

    config = read_config(model_dir)
    model = skeleton_of(config)
    own = index is None
    index = TensorIndex.open(model_dir) if own else index
    try:
        check_state_matches({n: tuple(p.shape) for n, p in model.named_parameters()},
                            {n: (t.shape, t.dtype) for n, t in index.tensors.items()}, tied_parameter_names(model),
                            base_prefix=getattr(model, "base_model_prefix", None) or None,
                            ignore_unexpected=[*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
                                               *(rf"(^|\.){re.escape(n)}$" for n, _ in model.named_buffers())],  # saved buffers
                            where=str(model_dir))
        if norm_names is None:
            norm_names = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
        check_norm_tensors(index, norm_names, getattr(model, "base_model_prefix", None))
    finally:
        if own:
            index.close()


def check_norm_tensors(index: Any, modules: Iterable[str], base_prefix: str | None = None) -> None:
    """Every weight/bias/λ of the named norm modules in ``index`` is float and finite (they are small: read them)."""
    strip = f"{base_prefix}." if base_prefix else None
    for module in modules:
        for leaf in ("weight", "bias", "lam"):
            name = f"{module}.{leaf}"
            if name not in index and strip and name.startswith(strip):
                name = name[len(strip):]
            if name not in index:
                continue
            check_norm_dtype(name, index.tensors[name].dtype)
            check_finite(f"norm tensor {name!r}", index.get_numpy(name))


# ----------------------------------------------------------------------------- fine-tune resume


def run_fingerprint(model: str | Path, options: Mapping[str, Any], data_texts: Iterable[str] | None = None,
                    exclude: Iterable[str] = ("resume", "force", "steps", "save_every", "eval_every", "out")) -> str:
    """A hash of what makes a fine-tune run: the model's manifest/config, the training options that change
    the trajectory, and the data.  A checkpoint resumes only a run with the same fingerprint."""
    h = hashlib.sha256()
    p = Path(model)
    for f in ("ibnorm_manifest.json", "config.json"):
        if (p / f).is_file():
            h.update((p / f).read_bytes())
    h.update(json.dumps({k: v for k, v in sorted(options.items()) if k not in set(exclude)}, default=str).encode())
    for text in data_texts or ():
        h.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()


def check_resume(checkpoint_dir: str | Path, progress: Any, fingerprint: str) -> None:
    """Refuse a checkpoint whose ``progress.json`` (parsed: ``progress``) is junk or belongs to another run."""
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int) or isinstance(progress.get("step"), bool):
        raise StateMismatchError(f"{checkpoint_dir} is not a usable checkpoint (progress.json is damaged)")
    if progress.get("fingerprint") != fingerprint:
        raise StateMismatchError(f"{checkpoint_dir} belongs to another run (different model, options or data); "
                                 f"start again with --force instead of --resume")


def read_progress(checkpoint_dir: str | Path, fingerprint: str) -> dict:
    """The parsed ``progress.json`` of a checkpoint of this run (fingerprint), or one line refusing it."""
    d = Path(checkpoint_dir)
    try:
        progress = json.loads((d / "progress.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise StateMismatchError(f"{d} is not a usable checkpoint (progress.json is missing or damaged)") from None
    check_resume(d, progress, fingerprint)
    return progress


def read_checkpoint(checkpoint_dir: str | Path, fingerprint: str, model_params: Mapping[str, tuple[int, ...]] | None = None,
                    tied: Iterable[str] = ()) -> dict:
    """Validate a fine-tune checkpoint before anything is restored; returns its parsed ``progress.json``.

    Refuses (one line each) a damaged ``progress.json``, a checkpoint of another run (fingerprint), a
    malformed ``model.safetensors`` and, given ``model_params`` (name → shape of the model being
    trained), weights that would not restore every parameter exactly (the strict-loading condition).
    """
    from .errors import SourceError
    from .io.safetensors_index import read_header

    d = Path(checkpoint_dir)
    progress = read_progress(d, fingerprint)
    try:
        _, tensors = read_header(d / "model.safetensors")
    except SourceError as e:
        raise StateMismatchError(f"{d} is not a usable checkpoint: {e}") from None
    if model_params is not None:
        check_state_matches(model_params, {n: (t.shape, t.dtype) for n, t in tensors.items()}, tied, where=str(d))
    return progress


def load_trainer_state(path: str | Path) -> dict:
    """The optimizer/RNG state of a checkpoint (tensors only, no code), or one line saying it is damaged."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  truncated zip, junk bytes, pickled code refused by weights_only
        raise StateMismatchError(f"{path} is damaged ({type(e).__name__}); start again with --force") from None
    if not isinstance(state, dict) or "optimizer" not in state or "rng" not in state:
        raise StateMismatchError(f"{path} is damaged (no optimizer or RNG state); start again with --force")
    return state


# ----------------------------------------------------------------------------- export


# Formats that cannot carry IBNorm: why, and what to use instead (``ibnorm export`` refuses them).
_NO_IBNORM = ("no IBNorm: llama.cpp's graph of each architecture is fixed C++, so exporting a converted model as "
              "plain LLaMA would silently drop λ")
_INSTEAD = "use --format onnx (onnxruntime), or serve the directory with transformers/vLLM/SGLang (trust_remote_code)"
REFUSED_EXPORT_FORMATS = {"gguf": _NO_IBNORM, "ggml": _NO_IBNORM, "llama.cpp": _NO_IBNORM}
EXPORT_FORMATS = ("onnx",)
ONNX_GROUPINGS = ("rms", "layer")
# protobuf's limit on one ONNX file; larger models need external data, which this export does not write.
ONNX_MAX_BYTES = 2**31 - 2**26


@dataclass(frozen=True)
class ExportPlan:
    directory: Path
    out: Path
    kind: str  # "causal-lm" | "sentence-embedding"
    manifest: dict


def _converted_dir(directory: str | Path) -> tuple[Path, dict]:
    from .io.manifest import MANIFEST, read_manifest

    p = Path(directory)
    if not p.exists():
        raise SourceError(f"not a converted model directory: {p} does not exist")
    if not p.is_dir():
        raise SourceError(f"not a converted model directory: {p} is not a directory")
    if not (p / MANIFEST).is_file():
        raise SourceError(f"not a converted model directory: {p} has no {MANIFEST} (convert it with `ibnorm convert` first)")
    return p, read_manifest(p)


def _check_export_out(out: str | Path, directory: Path, force: bool) -> Path:
    o = Path(os.path.abspath(out))
    if o.is_dir():
        raise OutputError(f"--out {out} is a directory; name the .onnx file to write")
    if o.exists() or o.is_symlink():
        if not o.is_file():
            raise OutputError(f"--out {out} is not a regular file; name a new .onnx file")
        if not force:
            raise OutputExistsError(f"--out {out} exists; pass --force to replace it")
    if not o.parent.is_dir():
        raise OutputError(f"--out {out}: the directory {o.parent} does not exist")
    if Path(os.path.realpath(directory)) in Path(os.path.realpath(o)).parents:
        raise OutputError(f"--out {out} is inside the converted directory {directory}; write it elsewhere")
    return o


def check_export(directory: str | Path, fmt: str, out: str | Path | None, force: bool = False) -> ExportPlan:
    """Everything ``ibnorm export`` needs checked before it loads a model: format, directory, output."""
    fmt = fmt.strip().lower()
    if fmt in REFUSED_EXPORT_FORMATS:
        raise OptionError(f"--format {fmt} cannot carry IBNorm ({REFUSED_EXPORT_FORMATS[fmt]}); {_INSTEAD}")
    if fmt not in EXPORT_FORMATS:
        raise OptionError(f"--format {fmt!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    if out is None:
        raise OptionError("--out FILE is required (the .onnx file to write)")
    path, manifest = _converted_dir(directory)
    if manifest["family"] != "hf":
        groupings = sorted({layer["grouping"] for layer in manifest["layers"]})
        raise SourceError(f"ONNX export supports converted transformers models; {path} is a {manifest['family']} model "
                          f"({'/'.join(groupings)} IBNorm layers): load it with ibnorm.load and export it yourself")
    for layer in manifest["layers"]:
        grouping = layer.get("grouping", layer.get("variant"))
        if grouping not in ONNX_GROUPINGS:
            raise SourceError(f"ONNX export supports {'/'.join(ONNX_GROUPINGS)} IBNorm layers; {layer['name']} is {grouping}")
    if not str(getattr(read_config(path), "model_type", "")).startswith("ibnorm_"):
        raise SourceError(f"{path} is in the first converted format (no shipped code); run `ibnorm upgrade {path}` first")
    if manifest["task"] == "causal-lm":
        kind = "causal-lm"
    elif (path / "modules.json").is_file():
        kind = "sentence-embedding"
    else:
        raise SourceError(f"ONNX export supports causal LMs and sentence-transformers encoders; {path} is a "
                          f"{manifest['task']} without modules.json")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if size > ONNX_MAX_BYTES:
        raise SourceError(f"{path} holds {_gib(size)} of weights; one ONNX file holds under 2 GiB (external data is not supported)")
    return ExportPlan(path, _check_export_out(out, path, force), kind, manifest)


# ----------------------------------------------------------------------------- study --from


def validate_pretrained_study(*, data: str | None, eval_data: str | None, train: str, train_modes: Iterable[str],
                              steps: int, seeds: int | None, lrs: Iterable[float], seq_len: int, batch_size: int, warmup: int,
                              val_blocks: int, test_docs: int, calib: str, calib_samples: int, save_every: int,
                              threads: int, jobs: int | None, launcher: str | None) -> None:
    """Every option of ``study --from`` that needs no model, checked before any work."""
    if not data:
        raise OptionError("--from needs --data (the fine-tuning text)")
    if train not in train_modes:
        raise OptionError(f"unknown --train {train!r}; choose one of {', '.join(train_modes)}")
    for lr in lrs:
        check_lr(lr)
    if len(set(lrs)) != len(list(lrs)):
        raise OptionError("--lrs lists a learning rate twice")
    check_seq_len(seq_len)
    check_calib_samples(calib_samples)
    for name, v in (("--steps", steps), ("--batch-size", batch_size), ("--val-blocks", val_blocks), ("--test-docs", test_docs)):
        check_range(name, v, low=1, integer=True)
    for name, v in (("--warmup", warmup), ("--save-every", save_every), ("--threads", threads)):
        check_range(name, v, low=0, integer=True)
    if seeds is not None:
        check_range("--seeds", seeds, low=1, high=20, integer=True)  # the exact sign-flip test enumerates 2^seeds
    if jobs is not None:
        check_range("--jobs", jobs, low=1, integer=True)
    if launcher not in (None, "torchrun", "accelerate"):
        raise OptionError(f"unknown --launcher {launcher!r}; choose torchrun or accelerate")
    for name, path in (("--data", data), ("--eval-data", eval_data), ("--calib", calib)):
        if path and not path.startswith("builtin:") and not Path(path).exists():
            raise OptionError(f"{name}: data not found: {path}")
