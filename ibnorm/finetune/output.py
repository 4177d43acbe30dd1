"""The fine-tune's output: the model in convert's format (or, for a baseline, its own), the
fine-tune record in the manifest, metrics.jsonl and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..io.atomic import atomic_directory
from ..io.checkpoint import write_json_atomic
from ..io.sources import LoadedModel
from ..layers import IBNormBase
from ..pipeline.families import family_of
from ..pipeline.write import write_model
from .options import FinetuneOptions, FinetuneResult


def finetune_record(opts: FinetuneOptions, result: FinetuneResult) -> dict:
    final = result.evals[-1]
    return {
        "data": opts.data, "eval_data": opts.eval_data or "held-out 10% of --data", "steps": opts.steps, "train": opts.train,
        "lr": opts.lr, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum, "seq_len": opts.seq_len, "seed": opts.seed,
        "final": {k: v for k, v in final.items() if k in ("loss", "perplexity", "accuracy")},
        "before": result.evals[0] if result.evals else None, "source": result.source_eval, "kernel": result.kernel,
    }


def metrics_files(result: FinetuneResult) -> dict[str, bytes]:
    from ..plot import loss_curve_png

    metrics = "".join(json.dumps({"step": i + 1, "loss": l}) + "\n" for i, l in enumerate(result.losses))
    metrics += "".join(json.dumps({"eval": e}) + "\n" for e in result.evals)
    metrics += "".join(json.dumps(record) + "\n" for record in result.information)  # {"step", "mi"}: --mi-every
    return {"metrics.jsonl": metrics.encode(), "loss_curve.png": loss_curve_png(result.losses, result.evals)}


def _update_lambdas(model: nn.Module, manifest: dict) -> None:
    for m in model.modules():  # saved and reported λ is the effective one
        if isinstance(m, IBNormBase):
            m.lam.data.clamp_(min=0.0)
    for layer in manifest["layers"]:
        lam = model.get_submodule(layer["name"]).effective_lam.float().reshape(-1)
        layer.update(lam_mean=float(lam.mean()), lam_min=float(lam.min()), lam_max=float(lam.max()),
                     frac_lam_ge_0_1=float((lam >= 0.1).float().mean()), frac_lam_zero=float((lam == 0).float().mean()))


def write_output(model: nn.Module, loaded: LoadedModel, out: Path, opts: FinetuneOptions, result: FinetuneResult) -> None:
    if opts.train == "lora":
        model = model.merge_and_unload()
    manifest = loaded.info.get("manifest")
    files = metrics_files(result)
    with atomic_directory(out, opts.force) as tmp:
        if manifest is None:  # baseline: the model in its own format plus the fine-tune record
            family_of(loaded.library, loaded.task).save_weights(model, tmp, "5GB")
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "ibnorm_finetune.json", {"source": loaded.source, "finetune": finetune_record(opts, result)})
        else:
            manifest = json.loads(json.dumps(manifest))  # a copy
            manifest["finetune"] = finetune_record(opts, result)
            _update_lambdas(model, manifest)
            final, metric = result.evals[-1], "perplexity" if "perplexity" in result.evals[-1] else "accuracy"
            card = (f"# Fine-tuned IBNorm model\n\n{opts.steps} steps ({opts.train}) on `{opts.data}`: "
                    f"held-out {metric} {result.evals[0][metric]:.4g} → {final[metric]:.4g}.\n")
            write_model(tmp, model, family_of(loaded.library, loaded.task), manifest, tokenizer=loaded.tokenizer,
                        source_dir=loaded.hf_dir, card=card)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
