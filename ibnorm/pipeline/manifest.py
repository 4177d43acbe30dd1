"""The record of a conversion: one manifest builder, one model card, one config section."""

from __future__ import annotations

import time
from pathlib import Path

from ..io.checkpoint import versions
from torch import nn

from ..io.manifest import FORMAT
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


def converted_config(base: dict, manifest: dict, modules: dict[str, nn.Module]) -> dict:
    """The output's config.json.  transformers: an architecture of its own (``ibnorm_<base>``, every base
    field kept, the IBNorm layers listed, ``auto_map`` to the shipped code), so no tool reads it as the base
    model.  timm: an architecture timm refuses, naming ``ibnorm.load``."""
    from ..hf.export import hf_config_for, layer_entry, timm_config_for

    op = manifest["options"]["op"]
    if manifest["family"] == "timm":
        return timm_config_for(base["architecture"], base.get("num_classes"), op)
    return hf_config_for(base, [layer_entry(name, m) for name, m in modules.items()], op)


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
    if manifest["family"] == "timm":
        lines += ["", "Load it with `ibnorm.load(path)`; `ibnorm_manifest.json` records every layer's λ and error.", ""]
    else:
        lines += ["", "Load it with `ibnorm.load(path)`, or with transformers: `AutoModelForCausalLM.from_pretrained(path)` "
                  "(`AutoModel` for encoders) after `import ibnorm`, or with `trust_remote_code=True` where ibnorm is not "
                  "installed (the modeling code ships in this directory). `ibnorm_manifest.json` records every layer's λ "
                  "and error.", ""]
    return "\n".join(lines)
