"""Write model directories atomically: the temporary directory, JSON files, side files, versions."""

from __future__ import annotations

import json
import os
import platform
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputExistsError
from .manifest import MANIFEST

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
_COPY_MAX_BYTES = 64 * 1024 * 1024


@contextmanager
def atomic_directory(out: str | Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


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
        if not p.is_file() or p.name.startswith(".") or p.suffix in _WEIGHT_SUFFIXES or p.stat().st_size > _COPY_MAX_BYTES:
            continue
        if rel.as_posix() in ("config.json", "model.safetensors.index.json", "README.md", MANIFEST) or (dst / rel).exists():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)
        copied.append(rel.as_posix())
    return copied
