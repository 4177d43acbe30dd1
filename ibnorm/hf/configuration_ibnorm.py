"""Configuration of an ibnorm-converted transformers model (self-contained: torch + transformers only).

This file is shipped inside every converted model directory (``auto_map``) and is also what
``import ibnorm`` registers with transformers' Auto classes.  A converted model's ``config.json``
is its base model's config with ``model_type`` ``ibnorm_<base model_type>`` and an ``ibnorm``
section listing the IBNorm layers, so a stock transformers refuses it instead of building the
base architecture.

Config classes are made on demand (module ``__getattr__``): ``IBNormLlamaConfig`` subclasses
``LlamaConfig`` and inherits its fields, defaults and attribute aliases.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

MODEL_TYPE_PREFIX = "ibnorm_"
CODE_FILES = ("configuration_ibnorm.py", "modeling_ibnorm.py", "torch_rownorm.py")

_CONFIG_CLASSES: dict = {}


def base_model_type(model_type: str) -> str:
    """``ibnorm_llama`` → ``llama``."""
    if not model_type.startswith(MODEL_TYPE_PREFIX):
        raise ValueError(f"{model_type!r} is not an ibnorm model type (expected the prefix {MODEL_TYPE_PREFIX!r})")
    return model_type[len(MODEL_TYPE_PREFIX):]


def code_file_source(name: str) -> Path:
    """Where a shipped code file is: beside this one in a model directory; in the ibnorm package the
    torch form lives with the kernels (``ibnorm/kernels/torch_rownorm.py``)."""
    here = Path(__file__).resolve().parent
    return here / name if (here / name).is_file() else here.parent / "kernels" / name


def write_code_files(save_directory) -> None:
    """Copy the shipped code files next to a saved config, so ``auto_map`` resolves."""
    out = Path(save_directory)
    for name in CODE_FILES:
        src, dst = code_file_source(name), out / name
        if src.is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)


def _save_pretrained(self, save_directory, *args, **kwargs):
    out = self._ibnorm_base_save_pretrained(save_directory, *args, **kwargs)
    write_code_files(save_directory)
    return out


def config_class_for(base_type: str) -> type:
    """The config class of ``ibnorm_<base_type>``: a subclass of the base config class."""
    cls = _CONFIG_CLASSES.get(base_type)
    if cls is None:
        base = CONFIG_MAPPING[base_type]
        cls = type(f"IBNorm{base.__name__}", (base,), {
            "model_type": MODEL_TYPE_PREFIX + base_type,
            "ibnorm_base_model_type": base_type,
            "__module__": __name__,
            "_ibnorm_base_save_pretrained": base.save_pretrained,
            "save_pretrained": _save_pretrained,
        })
        _CONFIG_CLASSES[base_type] = cls
    return cls


def _base_type_of_class_name(name: str) -> str:
    base_name = name[len("IBNorm"):]
    for model_type, cls_name in _config_names().items():
        if cls_name == base_name:
            return model_type
    raise AttributeError(name)


def _config_names() -> dict:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return CONFIG_MAPPING_NAMES


def __getattr__(name: str):
    # ``auto_map`` names a class such as ``IBNormLlamaConfig``; build it on first access.
    if name.startswith("IBNorm") and name.endswith("Config"):
        return config_class_for(_base_type_of_class_name(name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
