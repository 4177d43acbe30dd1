"""Register ibnorm's converted architectures with transformers' Auto classes — lazily.

``import ibnorm`` must stay light (``ibnorm inspect`` runs without torch), and registering a real
config class means importing torch and the base configuration module; a real model class means
importing the base modeling module.  So registration happens in two cheap stages:

1. When transformers' Auto configuration module is (or already was) imported — a one-shot
   post-import hook installed by :func:`install` — every ``ibnorm_<type>`` for every model type
   transformers knows is registered with ``AutoConfig`` as a small placeholder class (dictionary
   inserts, nothing imported).
2. The first time a placeholder is used (``AutoConfig.from_pretrained``/``for_model`` of a converted
   directory), it builds the real config class (a subclass of the base config), registers it
   with ``AutoConfig``, and registers the ``IBNorm<Base>`` model classes with each Auto model class
   whose mapping has the base type.  Only then is the base modeling module imported.

Because the registered classes live outside ``transformers.``, transformers prefers them to the
``auto_map`` remote code of the directory, so no ``trust_remote_code`` is needed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys
import threading
import warnings

_TRIGGER = "transformers.models.auto.configuration_auto"
# The same prefix as configuration_ibnorm.MODEL_TYPE_PREFIX: that file is self-contained, and
# importing it here would re-enter the transformers import this hook runs inside.
MODEL_TYPE_PREFIX = "ibnorm_"
# Auto classes a converted model is registered with (and named in ``auto_map``), when the base
# type appears in their mapping.
AUTO_MODEL_MAPPINGS = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}

_lock = threading.Lock()
_state = {"placeholders": False, "real": set()}


def base_classes_for(base_type: str) -> dict[str, str]:
    """{Auto class name: base model class name} for the Auto classes that support ``base_type``."""
    from transformers.models.auto import modeling_auto

    out = {}
    for auto, mapping in AUTO_MODEL_MAPPINGS.items():
        name = getattr(modeling_auto, mapping, {}).get(base_type)
        if isinstance(name, str):
            out[auto] = name
    return out


def register_model_type(base_type: str) -> type:
    """Register ``ibnorm_<base_type>`` (config and model classes) now; returns the config class."""
    import transformers

    from .configuration_ibnorm import config_class_for
    from .modeling_ibnorm import model_class_for

    with _lock:
        config_cls = config_class_for(base_type)
        if base_type in _state["real"]:
            return config_cls
        transformers.AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto, base_name in base_classes_for(base_type).items():
            getattr(transformers, auto).register(config_cls, model_class_for(base_name), exist_ok=True)
        _state["real"].add(base_type)
        return config_cls


class _Placeholder:
    """Stands for ``ibnorm_<type>`` in AutoConfig until first use (see the module docstring)."""

    model_type = ""
    ibnorm_base_model_type = ""

    def __new__(cls, *args, **kwargs):
        return cls._real()(*args, **kwargs)

    @classmethod
    def _real(cls) -> type:
        return register_model_type(cls.ibnorm_base_model_type)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        return cls._real().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._real().from_pretrained(*args, **kwargs)


def register_placeholders() -> None:
    """Stage 1: a placeholder for every ``ibnorm_<type>``; cheap, imports nothing new."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    with _lock:
        if _state["placeholders"]:
            return
        for base_type, cls_name in list(CONFIG_MAPPING_NAMES.items()):
            key = MODEL_TYPE_PREFIX + base_type
            if key in CONFIG_MAPPING:
                continue
            qualname = "_placeholder_" + re.sub(r"\W", "_", base_type)
            placeholder = type(f"IBNorm{cls_name}", (_Placeholder,), {
                "model_type": key, "ibnorm_base_model_type": base_type, "__module__": __name__, "__qualname__": qualname})
            globals()[qualname] = placeholder  # picklable by reference, like any class
            CONFIG_MAPPING.register(key, placeholder, exist_ok=True)
        _state["placeholders"] = True


def _on_transformers_auto() -> None:
    try:
        register_placeholders()
    except Exception as e:  # never break the user's transformers import
        warnings.warn(f"ibnorm could not register its architectures with transformers: {e}", stacklevel=2)


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, loader, after) -> None:
        self._loader, self._after = loader, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._after()

    def __getattr__(self, name):  # get_source, get_filename, … for tools that inspect modules
        return getattr(self._loader, name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs a callback once, right after ``_TRIGGER`` has been imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _WrappedLoader(spec.loader, _on_transformers_auto)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PostImportHook)]


def install() -> None:
    """Called by ``import ibnorm``: register now if transformers' Auto classes are loaded, else on their import."""
    if _TRIGGER in sys.modules:
        _on_transformers_auto()
    elif not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())
