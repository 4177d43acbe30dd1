"""What is in a checkpoint, from its headers: tensors, dtypes, bytes, norm layers, λ statistics.

Only headers are parsed; the small 1-D norm weights and λ tensors are read
to flag NaN/Inf and out-of-range λ.  GGUF files are read through the gguf package's memory-mapped reader.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import SourceError
from .io.manifest import MANIFEST, read_manifest
from .io.safetensors_index import FLOAT_DTYPES, TensorIndex
from .validate import check_not_special

# Parameter names that belong to normalization layers in HF/timm checkpoints.
_NORM_NAME = re.compile(r"(^|[._])(norm|layernorm|layer_norm|ln|ln_\w+|bn\d*|rmsnorm|\w*_norm|\w*norm\d*)([._]|$)", re.I)
LAMBDA_MAX_REASONABLE = 10.0


def _norm_layers(names: list[str], index: TensorIndex | None) -> dict[str, list[str]]:
    layers: dict[str, list[str]] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        if leaf not in ("weight", "bias", "lam", "running_mean", "running_var"):
            continue
        shape = index.tensors[name].shape if index is not None else None
        if leaf == "lam" or (_NORM_NAME.search(module) and (shape is None or len(shape) == 1)):
            layers.setdefault(module, []).append(leaf)
    return layers


def inspect_checkpoint(path: str | Path) -> dict:
    """A JSON-able description of a safetensors file, a (sharded or converted) directory, or a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"not found: {path}")
    check_not_special(path)
    if path.suffix == ".gguf":
        return _inspect_gguf(path)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise SourceError(f"{path} has no safetensors files")
    if path.is_file() and path.suffix != ".safetensors":
        raise SourceError(f"{path}: not a safetensors or GGUF file")
    index = TensorIndex.open(path)
    try:
        dtypes: Counter = Counter()
        bytes_by_dtype: Counter = Counter()
        params = 0
        for t in index.tensors.values():
            dtypes[t.dtype] += 1
            bytes_by_dtype[t.dtype] += t.nbytes
            params += t.numel
        names = sorted(index.tensors)
        norms = _norm_layers(names, index)
        problems = []
        lam_values = []
        for module, leaves in norms.items():
            for leaf in leaves:
                info = index.tensors[f"{module}.{leaf}"]
                if leaf in ("weight", "bias", "lam") and info.dtype not in FLOAT_DTYPES:
                    problems.append(f"{module}.{leaf}: dtype {info.dtype}, norm tensors must be float")
                    continue
                t = index.get_numpy(f"{module}.{leaf}")
                if t is None:
                    continue
                if not np.isfinite(t).all():
                    problems.append(f"{module}.{leaf}: NaN/Inf")
                if leaf == "lam":
                    lam = t.reshape(-1)
                    lam_values.append((module, lam))
                    if bool((lam < 0).any()) or bool((lam > LAMBDA_MAX_REASONABLE).any()):
                        problems.append(f"{module}.lam out of range [0, {LAMBDA_MAX_REASONABLE}]: min {lam.min():.3g}, max {lam.max():.3g}")
        out = {
            "path": str(path),
            "files": len(index.files),
            "tensors": len(index.tensors),
            "parameters": params,
            "bytes": sum(bytes_by_dtype.values()),
            "dtypes": {d: {"tensors": dtypes[d], "bytes": bytes_by_dtype[d]} for d in sorted(dtypes)},
            "norm_layers": len(norms),
            "norm_layer_names": sorted(norms),
            "problems": problems,
        }
        if lam_values:
            allv = np.concatenate([v for _, v in lam_values])
            out["lambda"] = {
                "layers": len(lam_values), "mean": float(allv.mean()), "min": float(allv.min()), "max": float(allv.max()),
                "frac_ge_0_1": float((allv >= 0.1).mean()), "frac_zero": float((allv == 0).mean()),
                "per_layer": {m: {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)} for m, v in lam_values},
            }
        root = path if path.is_dir() else path.parent
        if (root / MANIFEST).exists():
            m = read_manifest(root)
            out["manifest"] = {k: m.get(k) for k in ("source", "task", "dtype", "options", "calibration", "end_to_end", "evaluation", "finetune", "written", "versions")}
            out["manifest"]["layers"] = len(m.get("layers", []))
            problems.extend(manifest_problems(m, index))
        return out
    finally:
        index.close()


def manifest_problems(manifest: dict, index: TensorIndex) -> list[str]:
    """Where a (schema-valid) manifest and the weights disagree: the checks ``ibnorm.load`` refuses on."""
    problems = []
    layers = manifest["layers"]
    missing = [l["name"] for l in layers if f"{l['name']}.lam" not in index]
    if missing:
        problems.append(f"manifest names {len(missing)} layers without λ in the weights (e.g. {missing[0]!r})")
    for l in layers:
        info = index.tensors.get(f"{l['name']}.lam")
        if info is not None and list(info.shape) != list(l["lam_shape"]):
            problems.append(f"{l['name']!r}.lam has shape {list(info.shape)}, the manifest says {l['lam_shape']}")
    named = {f"{l['name']}.lam" for l in layers}
    unlisted = sorted(n for n in index.tensors if n.endswith(".lam") and n not in named)
    if unlisted:
        problems.append(f"weights hold {len(unlisted)} λ tensors the manifest does not list (e.g. {unlisted[0]!r})")
    return problems


def _inspect_gguf(path: Path) -> dict:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path), "r")
    except Exception as e:
        raise SourceError(f"{path} is not a readable GGUF file ({type(e).__name__})") from None
    types: Counter = Counter()
    nbytes: Counter = Counter()
    params = 0
    names = []
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        nbytes[t.tensor_type.name] += int(t.n_bytes)
        params += int(t.n_elements)
        names.append(t.name)
    norms = sorted({n.rpartition(".")[0] for n in names if "norm" in n})
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[-1]).decode() if arch_field is not None else None
    return {
        "path": str(path), "format": "gguf", "architecture": arch, "files": 1, "tensors": len(names), "parameters": params,
        "bytes": sum(nbytes.values()), "dtypes": {d: {"tensors": types[d], "bytes": nbytes[d]} for d in sorted(types)},
        "norm_layers": len(norms), "norm_layer_names": norms, "problems": [],
    }
