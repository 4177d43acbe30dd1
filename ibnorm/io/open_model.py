"""Open any model ibnorm can run: a converted directory or any source ``load_source`` accepts."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import MANIFEST, load, read_manifest
from .sources import LoadedModel, load_source


def open_model(path: str, *, allow_pickle: bool = False, weights: str | None = None, pretrained: bool = True) -> LoadedModel:
    p = Path(path)
    if p.is_dir() and (p / MANIFEST).exists():
        manifest = read_manifest(p)
        model = load(p)
        tokenizer = None
        if manifest["family"] == "hf":
            import transformers

            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(p)
            except Exception:
                tokenizer = None
        return LoadedModel(model, manifest["family"], manifest["task"], path, str(p), tokenizer=tokenizer,
                           timm_name=manifest["source"]["resolved"][5:] if manifest["family"] == "timm" else None,
                           hf_dir=p if manifest["family"] == "hf" else None, info={"manifest": manifest})
    return load_source(path, allow_pickle=allow_pickle, weights=weights, pretrained=pretrained)

