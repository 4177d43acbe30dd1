"""Files beside the weights: JSON written atomically, side files copied from the source, versions.

The atomic output directory itself is ``io.atomic.atomic_directory``."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

from .manifest import MANIFEST

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
_COPY_MAX_BYTES = 64 * 1024 * 1024


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def versions() -> dict:
    import safetensors
    import torch
    import transformers

    from ..version import __version__

    out = {"ibnorm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "safetensors": safetensors.__version__, "python": platform.python_version()}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def copy_side_files(src: Path | None, dst: Path) -> list[str]:
    """Tokenizer, processor, generation and sentence-transformers files: everything small that is not weights."""
    copied = []
    if src is None:
        return copied
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts) or p.suffix in _WEIGHT_SUFFIXES or p.stat().st_size > _COPY_MAX_BYTES:
            continue
        if rel.as_posix() in ("config.json", "model.safetensors.index.json", "README.md", MANIFEST) or (dst / rel).exists():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)
        copied.append(rel.as_posix())
    return copied
