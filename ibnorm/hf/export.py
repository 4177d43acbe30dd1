"""What a converted directory's ``config.json`` says, and the code files shipped beside it.

transformers outputs: the base config with ``model_type`` ``ibnorm_<base>``, ``architectures``
``IBNorm<Base>``, an ``auto_map`` to the shipped code and an ``ibnorm`` section listing every IBNorm
layer (name, grouping, shape, eps, affine, λ shape, op).  timm outputs: an ``architecture`` timm does
not know, which names the way to load the model, so ``timm.create_model`` refuses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..io.manifest import FORMAT_2, MANIFEST
from .configuration_ibnorm import CODE_FILES, MODEL_TYPE_PREFIX, code_file_source
from .register import AUTO_MODEL_MAPPINGS, base_classes_for

TIMM_ARCHITECTURE_PREFIX = "ibnorm-converted:"
WEIGHT_CONVENTION = "y = weight * c_hat + bias; weight is the effective multiplier (Gemma's 1 + w folded in)"


def _grouping(module: nn.Module) -> tuple[str, int]:
    from ..layers import IBGroupNorm, IBLayerNorm, IBLayerNorm2d, IBNormRMS, IBNormRMS2d

    for cls, grouping, channel_dim in ((IBNormRMS2d, "rms", 1), (IBLayerNorm2d, "layer", 1), (IBNormRMS, "rms", -1),
                                       (IBLayerNorm, "layer", -1), (IBGroupNorm, "group", 1)):
        if isinstance(module, cls):
            return grouping, channel_dim
    raise ValueError(f"{type(module).__name__}: the transformers export supports rms, layer and group IBNorm layers")


def layer_entry(name: str, module: nn.Module) -> dict[str, Any]:
    """The ``config.ibnorm["layers"]`` entry of one IBNorm module (an ``ibnorm.layers`` instance)."""
    grouping, channel_dim = _grouping(module)
    if getattr(module, "act", None) is not None:
        raise ValueError(f"{name}: a norm followed by an activation cannot be exported to transformers")
    shape = list(module.normalized_shape) if grouping != "group" else [module.num_channels]
    return {
        "name": name,
        "grouping": grouping,
        "normalized_shape": shape,
        "channel_dim": channel_dim,
        "num_groups": getattr(module, "num_groups", None),
        "eps": float(module.eps),
        "weight": module.weight is not None,
        "bias": getattr(module, "bias", None) is not None,
        "op": module.op,
        "lam_shape": list(module.lam.shape),
    }


def layer_entries(model: nn.Module) -> list[dict[str, Any]]:
    """Entries for every IBNorm module of a converted model, in module order."""
    from ..layers import IBNormBase

    return [layer_entry(name, m) for name, m in model.named_modules() if isinstance(m, IBNormBase)]


def hf_config_for(base_config_dict: dict, layers: list[dict], op: str) -> dict:
    """The ``config.json`` of a converted transformers model.

    ``base_config_dict``: the source's config (``model.config.to_dict()``); ``layers``: from
    :func:`layer_entries`.  Every base field is kept; the model type becomes ``ibnorm_<base>``.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    base_type = base_config_dict.get("model_type", "")
    if base_type.startswith(MODEL_TYPE_PREFIX):
        raise ValueError(f"the config is already an ibnorm config ({base_type})")
    if base_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(f"model type {base_type!r} is unknown to this transformers version")
    cfg = {k: v for k, v in base_config_dict.items() if k not in ("auto_map", "ibnorm", "_name_or_path")}
    cfg["model_type"] = MODEL_TYPE_PREFIX + base_type
    cfg["architectures"] = [f"IBNorm{a}" for a in base_config_dict.get("architectures") or []]
    auto_map = {"AutoConfig": f"configuration_ibnorm.IBNorm{CONFIG_MAPPING_NAMES[base_type]}"}
    for auto, base_name in base_classes_for(base_type).items():
        auto_map[auto] = f"modeling_ibnorm.IBNorm{base_name}"
    cfg["auto_map"] = auto_map
    cfg["ibnorm"] = {
        "format": FORMAT_2,
        "manifest": MANIFEST,
        "op": op,
        "base_model_type": base_type,
        "weight_convention": WEIGHT_CONVENTION,
        "layers": layers,
    }
    return cfg


def base_config_dict(config_dict: dict) -> dict:
    """The base model's config from a converted one (what ``ibnorm.load`` builds its skeleton from)."""
    cfg = {k: v for k, v in config_dict.items() if k not in ("auto_map", "ibnorm")}
    model_type = cfg.get("model_type", "")
    if model_type.startswith(MODEL_TYPE_PREFIX):
        cfg["model_type"] = model_type[len(MODEL_TYPE_PREFIX):]
        cfg["architectures"] = [a.removeprefix("IBNorm") for a in cfg.get("architectures") or []]
    return cfg


def base_config(config_dict: dict):
    """The base model's transformers config (``LlamaConfig``, …) of a converted ``config.json``, either format."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = base_config_dict(config_dict)
    return CONFIG_MAPPING[base["model_type"]].from_dict(base)


def write_remote_code(out_dir: str | Path) -> list[str]:
    """Copy the self-contained configuration, modeling and torch-form files into ``out_dir``."""
    for name in CODE_FILES:
        dst = Path(out_dir) / name
        dst.unlink(missing_ok=True)  # a fresh file: never write through a hard link
        shutil.copyfile(code_file_source(name), dst)
    return list(CODE_FILES)


def timm_config_for(timm_name: str, num_classes: int | None, op: str) -> dict:
    """``config.json`` of a converted timm model: timm's loaders stop at the unknown architecture."""
    return {
        "architecture": f"{TIMM_ARCHITECTURE_PREFIX}{timm_name} (IBNorm layers: load it with ibnorm.load)",
        "library": "ibnorm",
        "num_classes": num_classes,
        "ibnorm": {"format": FORMAT_2, "manifest": MANIFEST, "op": op, "base_architecture": timm_name, "library": "timm"},
    }


def timm_base_name(config_dict: dict) -> str:
    """The timm architecture of a converted timm model's config (either format)."""
    base = config_dict.get("ibnorm", {}).get("base_architecture")
    return base if base else config_dict["architecture"]


__all__ = ["FORMAT_2", "AUTO_MODEL_MAPPINGS", "layer_entry", "layer_entries", "hf_config_for", "base_config_dict", "base_config",
           "write_remote_code", "timm_config_for", "timm_base_name"]
