"""Load converted models (``ibnorm.load``), and open anything ibnorm can run (``open_model``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import IBNormError, SourceError
from .io.manifest import MANIFEST, read_manifest
from .io.safetensors_index import TensorIndex
from .io.sources import TIMM_PREFIX, LoadedModel, load_source
from .layers import LEGACY_CLASS_NAMES, IBNormBase, from_spec
from .recognize import recognize
from .surgery import set_submodule
from .validate import check_not_special


def skeleton(path: Path, manifest: dict) -> nn.Module:
    """The architecture without weights: timm on CPU (small), transformers on the meta device."""
    cfg = json.loads((path / "config.json").read_text())
    if manifest["family"] == "timm":
        import timm

        architecture = (cfg.get("ibnorm") or {}).get("base_architecture") or cfg["architecture"]
        return timm.create_model(architecture, pretrained=False, num_classes=cfg.get("num_classes") or 1000)
    import transformers
    from accelerate import init_empty_weights

    from .hf.export import base_config

    config = base_config(cfg)  # the base architecture; its norms are replaced from the manifest
    auto = transformers.AutoModelForCausalLM if manifest["task"] == "causal-lm" else transformers.AutoModel
    with init_empty_weights(include_buffers=False):
        return auto.from_config(config).eval()


def layers_from_manifest(model: nn.Module, manifest: dict) -> dict[str, IBNormBase]:
    """The IBNorm module of every layer the manifest lists (λ zero until the weights are loaded)."""
    out = {}
    for layer in manifest["layers"]:
        try:
            module = model.get_submodule(layer["name"])
        except AttributeError:
            raise IBNormError(f"manifest names layer {layer['name']!r}, which the architecture does not have") from None
        spec = recognize(module)
        if spec is None:
            raise IBNormError(f"manifest names {layer['name']!r} as a norm, but it is a {type(module).__name__}")
        op = layer.get("op") or manifest["options"]["op"]
        new = from_spec(spec, op=op, lam=torch.zeros(layer["lam_shape"]), grouping=layer["grouping"])
        if type(new).__name__ != LEGACY_CLASS_NAMES.get(layer["new_class"], layer["new_class"]):
            raise IBNormError(f"manifest says {layer['name']} is {layer['new_class']}, rebuilt as {type(new).__name__}")
        out[layer["name"]] = new
    return out


def _check_lambdas(index: TensorIndex, manifest: dict) -> None:
    for layer in manifest["layers"]:
        key = f"{layer['name']}.lam"
        if key not in index:
            raise IBNormError(f"manifest and weights disagree: {key} is missing from the weights")
        if list(index.tensors[key].shape) != list(layer["lam_shape"]):
            raise IBNormError(f"manifest and weights disagree: {key} has shape {list(index.tensors[key].shape)}, manifest says {layer['lam_shape']}")


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a converted model ready to run (eval mode), checking the manifest against the weights."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"not a converted model directory: {path}")
    manifest = read_manifest(path)
    index = TensorIndex.open(path)
    _check_lambdas(index, manifest)
    model = skeleton(path, manifest)
    for name, module in layers_from_manifest(model, manifest).items():
        set_submodule(model, name, module)
    state = {name: index.get(name) for name in index.tensors}
    index.close()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise IBNormError(f"weights do not fit the architecture: {str(e).strip().splitlines()[-1].strip()}") from None
    if unexpected:
        raise IBNormError(f"weights do not fit the architecture: unexpected tensor {unexpected[0]!r} (+{len(unexpected) - 1} more)")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise IBNormError(f"weights are incomplete: {still_meta[0]!r} missing (+{len(still_meta) - 1} more)")
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device=device)
    return model.eval()


def open_model(path: str, *, allow_pickle: bool = False, weights: str | None = None, pretrained: bool = True) -> LoadedModel:
    """A converted directory (through :func:`load`) or any source ``load_source`` accepts."""
    p = Path(path)
    check_not_special(p)
    if not (p.is_dir() and (p / MANIFEST).exists()):
        return load_source(path, allow_pickle=allow_pickle, weights=weights, pretrained=pretrained)
    manifest = read_manifest(p)
    model = load(p)
    tokenizer = None
    if manifest["family"] == "hf":
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(p)
        except Exception:
            tokenizer = None
    source = manifest["source"]
    architecture = source.get("architecture") or str(source["resolved"]).removeprefix(TIMM_PREFIX)
    info = {"manifest": manifest, **({"architecture": architecture} if manifest["family"] == "timm" else {})}
    return LoadedModel(model, manifest["family"], manifest["task"], path, str(p), tokenizer=tokenizer,
                       hf_dir=p if manifest["family"] == "hf" else None, info=info)
