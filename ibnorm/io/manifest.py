"""The manifest of a converted checkpoint: its name, format, schema, and reading it (no torch needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError, SourceError

MANIFEST = "ibnorm_manifest.json"
FORMAT_1 = "ibnorm-converted/1"  # layers name their grouping "variant"; config.json keeps the base model type
FORMAT = "ibnorm-converted/2"  # config.json is its own architecture (ibnorm_<base>, shipped code; see ibnorm/hf)
READABLE_FORMATS = (FORMAT_1, FORMAT)
FAMILIES = ("hf", "timm")
TASKS = ("causal-lm", "encoder", "image-classifier")
# Kept equal to ibnorm.COMPRESSION_OPS and the recognizer's KINDS (a test checks it): this module runs without torch.
OPS = ("tanh", "log", "power")
GROUPINGS = ("rms", "layer", "batch", "group")
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024

# Field → accepted types.  What `load`, `inspect`, `eval` and the renderers read without a fallback.
_TOP = {"format": str, "source": dict, "family": str, "task": str, "options": dict, "layers": list, "calibration": dict}
_OPTIONAL_TOP = {"skipped": list, "end_to_end": dict, "evaluation": dict, "finetune": dict, "dtype": str, "seconds": (int, float),
                 "written": str, "versions": dict, "copied_files": list, "shards": list}
_SOURCE = {"name": str, "resolved": str}
_LAYER = {"name": str, "new_class": str, "grouping": str, "lam_shape": list, "lam_mean": (int, float), "lam_min": (int, float),
          "lam_max": (int, float), "frac_lam_ge_0_1": (int, float), "error": (int, float)}
_LAYER_OPTIONAL = {"source_class": str, "op": str, "frac_lam_zero": (int, float), "note": str}


def _type_name(t) -> str:
    names = {str: "a string", dict: "an object", list: "a list", int: "an integer", float: "a number"}
    return names.get(t, "a number") if not isinstance(t, tuple) else "a number"


def _check_fields(where: str, obj: dict, required: dict, optional: dict, label: str) -> None:
    for key, types in required.items():
        if key not in obj:
            raise CorruptFileError(f"{where}: {label}lacks the field {key!r}")
    for key, types in {**required, **optional}.items():
        if key in obj and obj[key] is not None or key in required:
            v = obj[key]
            if isinstance(v, bool) or not isinstance(v, types):
                raise CorruptFileError(f"{where}: {label}field {key!r} must be {_type_name(types)}, not {type(v).__name__}")
            if isinstance(v, float) and not math.isfinite(v):
                raise CorruptFileError(f"{where}: {label}field {key!r} is {v} (not finite)")


def validate_manifest(manifest: Any, where: str | Path = MANIFEST) -> dict:
    """Schema check: the types and required fields every reader relies on; one error line naming the first fault."""
    where = str(where)
    if not isinstance(manifest, dict):
        raise CorruptFileError(f"{where}: a manifest must be a JSON object, not {type(manifest).__name__}")
    if manifest.get("format") not in READABLE_FORMATS:
        raise SourceError(f"{where}: unsupported format {manifest.get('format')!r} (expected {FORMAT})")
    _check_fields(where, manifest, _TOP, _OPTIONAL_TOP, "")
    _check_fields(where, manifest["source"], _SOURCE, {}, "source ")
    if manifest["family"] not in FAMILIES:
        raise CorruptFileError(f"{where}: family {manifest['family']!r} is not one of {', '.join(FAMILIES)}")
    if manifest["task"] not in TASKS:
        raise CorruptFileError(f"{where}: task {manifest['task']!r} is not one of {', '.join(TASKS)}")
    if manifest["options"].get("op") not in OPS:
        raise CorruptFileError(f"{where}: options.op {manifest['options'].get('op')!r} is not one of {', '.join(OPS)}")
    if not isinstance(manifest["calibration"].get("mode"), str):
        raise CorruptFileError(f"{where}: calibration lacks its mode")
    names = set()
    for i, layer in enumerate(manifest["layers"]):
        if not isinstance(layer, dict):
            raise CorruptFileError(f"{where}: layers[{i}] must be an object")
        if manifest["format"] == FORMAT_1 and "variant" in layer and "grouping" not in layer:
            layer["grouping"] = layer["variant"]  # readers see one name
        _check_fields(where, layer, _LAYER, _LAYER_OPTIONAL, f"layers[{i}] ")
        shape = layer["lam_shape"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CorruptFileError(f"{where}: layers[{i}] lam_shape {shape!r} must be a list of non-negative integers")
        if layer["grouping"] not in GROUPINGS:
            raise CorruptFileError(f"{where}: layers[{i}] grouping {layer['grouping']!r} is not one of {', '.join(GROUPINGS)}")
        if layer["name"] in names:
            raise CorruptFileError(f"{where}: layer {layer['name']!r} is listed twice")
        names.add(layer["name"])
    for key in ("end_to_end", "evaluation", "finetune"):
        _check_numbers_finite(where, key, manifest.get(key))
    return manifest


def _check_numbers_finite(where: str, key: str, value: Any) -> None:
    # A NaN metric in a manifest is a broken conversion reported as a result; refuse to show it as one.
    # (An infinite budget is an option meaning "no back-off", not a measurement.)
    if isinstance(value, float) and not math.isfinite(value) and not (key.endswith("budget") and value == math.inf):
        raise CorruptFileError(f"{where}: {key} is {value} (not finite)")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers_finite(where, f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_numbers_finite(where, f"{key}[{i}]", v)
FORMAT_2 = FORMAT


def read_manifest(path: str | Path) -> dict:
    """The manifest of a converted directory (or of the directory holding ``path``), schema-checked."""
    p = Path(path)
    mf = p / MANIFEST if p.is_dir() else p.parent / MANIFEST
    if not mf.is_file():
        raise SourceError(f"{path} is not an ibnorm conversion (no {MANIFEST})")
    try:
        raw = mf.read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read {mf}: {e.strerror}") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise CorruptFileError(f"{mf} is corrupt ({len(raw)} bytes is too large for a manifest)")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CorruptFileError(f"{mf} is corrupt (not UTF-8)") from None
    except RecursionError:
        raise CorruptFileError(f"{mf} is corrupt (nested too deeply)") from None
    except json.JSONDecodeError:
        raise CorruptFileError(f"{mf} is corrupt (not JSON)") from None
    return validate_manifest(manifest, mf)
