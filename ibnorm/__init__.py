"""ibnorm — replace the normalization layers of pretrained models with calibrated IBNorm layers.

Attributes load lazily (PEP 562) so that light commands such as ``ibnorm inspect`` start
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

# public name → module that defines it
_EXPORTS = {
    "compress": "compression",
    "COMPRESSION_OPS": "compression",
    "GROUPING_CHOICES": "layers",
    "IBNormBase": "layers",
    "IBNormRMS": "layers",
    "IBNormRMS2d": "layers",
    "IBRMSNorm": "layers",  # old names, kept loadable
    "IBRMSNorm2d": "layers",
    "IBLayerNorm": "layers",
    "IBLayerNorm2d": "layers",
    "IBBatchNorm": "layers",
    "IBBatchNorm1d": "layers",
    "IBBatchNorm2d": "layers",
    "IBBatchNorm3d": "layers",
    "IBGroupNorm": "layers",
    "from_module": "surgery",
    "from_spec": "layers",
    "project_lambdas": "layers",
    "NormSpec": "recognize",
    "recognize": "recognize",
    "register_recognizer": "recognize",
    "load": "loading",
    "open_model": "loading",
    "ConvertOptions": "pipeline",
    "ConversionResult": "pipeline",
    "convert_model": "pipeline",
    "convert_checkpoint": "pipeline",
}
_SUBMODULES = ("hf", "functional", "errors", "pipeline", "evaluate", "finetune", "surgery", "calibration", "kernels", "io",
               "data", "loading", "recognize", "layers", "spec")

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]


def _register_with_transformers() -> None:
    # Lets transformers' Auto classes load converted directories without remote code; cheap: it
    # registers when transformers' Auto classes are imported (see ibnorm/hf/register.py).
    from .hf.register import install

    install()


_register_with_transformers()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'ibnorm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
