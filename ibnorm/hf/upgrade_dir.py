"""``ibnorm upgrade DIR``: rewrite a directory of format ``ibnorm-converted/1`` into the current format.

The weights do not change (the state-dict keys are the same); ``config.json`` becomes the
``ibnorm_<base>`` architecture with its layer list, the code files are added (transformers outputs)
and the manifest records the upgrade.  The new directory is assembled beside the old one from hard
links and swapped in with renames, so an interrupted upgrade leaves the old directory as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import IBNormError, SourceError
from ..io.manifest import FORMAT_1, MANIFEST, read_manifest
from .export import FORMAT_2, hf_config_for, layer_entry, timm_config_for, write_remote_code


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(f"{path.parent} has no {path.name}") from None
    except json.JSONDecodeError:
        raise SourceError(f"{path} is corrupt (not JSON)") from None


def _hf_layer_entries(path: Path, manifest: dict) -> list[dict]:
    """Rebuild each layer as ``ibnorm.load`` does (base skeleton on the meta device) and describe it."""
    from ..loading import layers_from_manifest, skeleton

    entries = []
    for name, module in layers_from_manifest(skeleton(path, manifest), manifest).items():
        try:
            entries.append(layer_entry(name, module))
        except ValueError as e:
            raise IBNormError(str(e)) from None
    return entries


def _check_weights(path: Path, entries: list[dict]) -> None:
    from ..io.safetensors_index import TensorIndex

    index = TensorIndex.open(path)
    try:
        for e in entries:
            lam = index.tensors.get(f"{e['name']}.lam")
            if lam is None or list(lam.shape) != e["lam_shape"]:
                raise IBNormError(f"weights and manifest disagree on {e['name']}.lam")
            for part in ("weight", "bias"):
                if (f"{e['name']}.{part}" in index.tensors) != e[part]:
                    raise IBNormError(f"weights and manifest disagree on {e['name']}.{part}")
    finally:
        index.close()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_json(path: Path, obj: dict) -> None:
    # Replace the directory entry, never write through a hard link shared with the old directory.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _swap_in(path: Path, files: dict[str, dict], code: bool) -> None:
    tmp = path.parent / f".{path.name}.upgrade-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(path, tmp, copy_function=_link_or_copy)
        for name, obj in files.items():
            _write_json(tmp / name, obj)
        if code:
            write_remote_code(tmp)  # new files: nothing shared with the old directory is written through
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def upgrade(path: str | Path) -> dict[str, Any]:
    """Rewrite ``path`` (format ``ibnorm-converted/1``) in place into the current format.

    Returns what was done; a directory already in the current format is left alone.
    """
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"not a converted model directory: {path}")
    manifest = read_manifest(path)  # schema-checked; a format-1 layer's "variant" is read as its grouping
    fmt = manifest.get("format")
    if fmt == FORMAT_2:
        return {"path": str(path), "changed": False, "format": fmt, "reason": "already in the current format"}
    if fmt != FORMAT_1:
        raise SourceError(f"{path / MANIFEST}: unsupported format {fmt!r} (expected {FORMAT_1})")
    config = _read_json(path / "config.json")
    op = manifest["options"]["op"]
    if manifest["family"] == "hf":
        entries = _hf_layer_entries(path, manifest)
        _check_weights(path, entries)
        try:
            new_config = hf_config_for(config, entries, op)
        except ValueError as e:
            raise IBNormError(str(e)) from None
    elif manifest["family"] == "timm":
        new_config = timm_config_for(config["architecture"], config.get("num_classes"), op)
    else:
        raise SourceError(f"{path}: unknown family {manifest['family']!r} in the manifest")
    layers = [{k: v for k, v in layer.items() if k != "variant"} for layer in manifest["layers"]]
    new_manifest = {**manifest, "format": FORMAT_2, "layers": layers,
                    "upgraded": {"from": FORMAT_1, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    _swap_in(path, {"config.json": new_config, MANIFEST: new_manifest}, code=manifest["family"] == "hf")
    return {"path": str(path), "changed": True, "from": FORMAT_1, "format": FORMAT_2, "family": manifest["family"],
            "model_type": new_config.get("model_type") or new_config["architecture"], "layers": len(manifest["layers"])}
