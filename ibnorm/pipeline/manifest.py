"""The record of a conversion: one manifest builder, one model card, one config section."""

from __future__ import annotations

import time
from pathlib import Path

from ..io.checkpoint import versions
from ..io.manifest import FORMAT, MANIFEST
from .options import ConversionResult, ConvertOptions
from .plan import Plan


def build_manifest(plan: Plan, opts: ConvertOptions, result: ConversionResult, dtype: str, evaluation: dict) -> dict:
    return {
        "format": FORMAT,
        "source": plan.source,
        "family": plan.family.library,
        "task": plan.family.task,
        "dtype": dtype,
        "options": opts.record(),
        **result.summary(),
        "evaluation": evaluation,
    }


def finish_manifest(manifest: dict, copied: list[str], shards: list[str]) -> dict:
    """What is known only once the files are written."""
    manifest.update(copied_files=copied, shards=shards, written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    versions=versions())
    return manifest


def converted_config(base: dict, manifest: dict) -> dict:
    """The output's config.json: the source's, plus an ``ibnorm`` section."""
    return {**base, "ibnorm": {"format": FORMAT, "manifest": MANIFEST, "op": manifest["options"]["op"]}}


def model_card(manifest: dict) -> str:
    lam = [layer["lam_mean"] for layer in manifest["layers"]]
    source = manifest["source"]
    lines = [
        f"# {Path(str(source['name'])).name} with IBNorm",
        "",
        f"Converted by ibnorm {manifest.get('versions', {}).get('ibnorm', '')} from `{source['name']}` "
        f"(`{source['resolved']}`): {len(manifest['layers'])} normalization layers replaced by IBNorm "
        f"(op `{manifest['options']['op']}`, grouping `{manifest['options']['grouping']}`).",
        "",
        f"- calibration: {manifest['calibration']['mode']}"
        + (f" on `{manifest['calibration'].get('data')}`" if manifest['calibration'].get('data') else ""),
        f"- mean λ over layers: {sum(lam) / len(lam):.4g}",
    ]
    if manifest.get("end_to_end", {}).get("metric"):
        e = manifest["end_to_end"]
        lines.append(f"- end-to-end drift ({e['metric']}): {e['value']:.4g} (budget {e['budget']})")
    if manifest.get("evaluation"):
        e = manifest["evaluation"]
        lines.append(f"- {e['metric']}: source {e['source']}, converted {e['converted']}")
    lines += ["", "Load it with `ibnorm.load(path)`; `ibnorm_manifest.json` records every layer's λ and error.", ""]
    return "\n".join(lines)
