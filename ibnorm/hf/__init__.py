"""Converted checkpoints as their own transformers architecture (``ibnorm_<base>``).

``configuration_ibnorm.py`` and ``modeling_ibnorm.py`` are self-contained (torch + transformers
only; the modeling file imports ``ibnorm/kernels/torch_rownorm.py``, which needs only torch): the
three are copied into every converted directory (``auto_map``), and the first two are registered
with the Auto classes by ``import ibnorm`` (see ``register.py``).  ``export`` writes configs and code,
``upgrade`` rewrites directories of the first format.  This package imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "hf_config_for": "export",
    "layer_entries": "export",
    "write_remote_code": "export",
    "base_config_dict": "export",
    "base_config": "export",
    "timm_config_for": "export",
    "timm_base_name": "export",
    "upgrade": "upgrade_dir",
    "register_model_type": "register",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
