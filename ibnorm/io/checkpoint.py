"""Write converted models atomically, and load them back (``ibnorm.load``)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import IBNormError, OutputExistsError, SourceError
from .safetensors_index import TensorIndex

from .manifest import FORMAT, MANIFEST, read_manifest  # noqa: F401  (re-exported)
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
    import transformers

    import ibnorm

    out = {"ibnorm": ibnorm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "safetensors": safetensors.__version__, "python": platform.python_version()}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def _copy_side_files(src: Path | None, dst: Path) -> list[str]:
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


def save_converted(
    model: nn.Module,
    out: str | Path,
    manifest: dict,
    *,
    family: str,
    tokenizer=None,
    hf_dir: Path | None = None,
    timm_name: str | None = None,
    shard_size: str = "5GB",
    force: bool = False,
    model_card: str = "",
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a converted model directory atomically; returns its path."""
    out = Path(out)
    with atomic_directory(out, force) as tmp:
        if family == "hf":
            config = model.config
            config.ibnorm = {"format": FORMAT, "manifest": MANIFEST, "op": manifest["options"]["op"]}
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            manifest["copied_files"] = _copy_side_files(hf_dir, tmp)
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / "model.safetensors"))
            write_json_atomic(tmp / "config.json", {
                "architecture": timm_name, "library": "timm",
                "num_classes": getattr(model, "num_classes", None),
                "ibnorm": {"format": FORMAT, "manifest": MANIFEST, "op": manifest["options"]["op"]},
            })
        manifest["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest["versions"] = versions()
        write_json_atomic(tmp / MANIFEST, manifest)
        (tmp / "README.md").write_text(model_card)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out


def _skeleton(path: Path, manifest: dict) -> nn.Module:
    """The architecture without weights: timm on CPU (small), transformers on the meta device."""
    if manifest["family"] == "timm":
        import timm

        cfg = json.loads((path / "config.json").read_text())
        return timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg.get("num_classes") or 1000)
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(path)
    auto = transformers.AutoModelForCausalLM if manifest["task"] == "causal-lm" else transformers.AutoModel
    with init_empty_weights(include_buffers=False):
        return auto.from_config(config).eval()


def _install_ibnorm_layers(model: nn.Module, manifest: dict) -> None:
    from ..layers import from_spec
    from ..recognize import recognize
    from ..surgery import set_submodule

    op = manifest["options"]["op"]
    for layer in manifest["layers"]:
        try:
            module = model.get_submodule(layer["name"])
        except AttributeError:
            raise IBNormError(f"manifest names layer {layer['name']!r}, which the architecture does not have") from None
        spec = recognize(module)
        if spec is None:
            raise IBNormError(f"manifest names {layer['name']!r} as a norm, but it is a {type(module).__name__}")
        new = from_spec(spec, op=op, lam=torch.zeros(layer["lam_shape"]), variant=layer["variant"])
        if type(new).__name__ != layer["new_class"]:
            raise IBNormError(f"manifest says {layer['name']} is {layer['new_class']}, rebuilt as {type(new).__name__}")
        set_submodule(model, layer["name"], new)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a converted model ready to run (eval mode), checking the manifest against the weights."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"not a converted model directory: {path}")
    manifest = read_manifest(path)
    index = TensorIndex.open(path)
    for layer in manifest["layers"]:
        key = f"{layer['name']}.lam"
        if key not in index:
            raise IBNormError(f"manifest and weights disagree: {key} is missing from the weights")
        if list(index.tensors[key].shape) != list(layer["lam_shape"]):
            raise IBNormError(f"manifest and weights disagree: {key} has shape {list(index.tensors[key].shape)}, manifest says {layer['lam_shape']}")
    model = _skeleton(path, manifest)
    _install_ibnorm_layers(model, manifest)
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
