"""Commands: each parses options, calls ibnorm, renders the result."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .progress import stage_progress
from .render import console, num, pairs, pct, print_json, quiet_libraries, render_conversion, short_names, table, user_errors

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def _dtype(name: Optional[str]):
    import torch

    from ibnorm.errors import IBNormError

    if name is None:
        return None
    if name.lower() not in _DTYPES:
        raise IBNormError(f"unknown --dtype {name!r}; choose float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[name.lower()])


def ops_command(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the compression operations and groupings ibnorm implements."""
    import ibnorm

    rows = [(op.name, op.paper_name, op.formula) for op in ibnorm.COMPRESSION_OPS.values()]
    if json_out:
        print_json({"ops": [dict(zip(("op", "paper_name", "formula"), r)) for r in rows], "groupings": list(ibnorm.GROUPING_CHOICES)})
        return
    console.print(table("compression operations s_λ(z)", ("op", "paper", "formula"), rows))
    console.print(f"groupings: {', '.join(ibnorm.GROUPING_CHOICES)}")


def convert(
    source: str = typer.Argument(..., help="Model directory, hub id, .gguf file, timm:NAME, or a short name (smollm2-135m, gpt2, resnet50, …)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory, written atomically (default: ./NAME-ibnorm)."),
    grouping: str = typer.Option("auto", "--grouping", "--variant", help="auto|rms|layer|batch|group (auto keeps the source's grouping)."),
    op: str = typer.Option("tanh", help="Compression: tanh (IBNorm-T), log (IBNorm-L), power (IBNorm-S)."),
    lam: Optional[float] = typer.Option(None, "--lam", help="Fixed λ for every channel (no search); 0 reproduces the source."),
    calib: Optional[str] = typer.Option(None, help="Calibration data: text file/dir, .jsonl, image folder, or builtin:pydoc:train."),
    calib_samples: int = typer.Option(32, help="Calibration samples (token blocks or images)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per calibration block (default: 256, or the model's positions if fewer)."),
    tolerance: float = typer.Option(0.001, help="Per-layer relative squared output error allowed after the affine refit."),
    budget: float = typer.Option(0.01, help="End-to-end budget: next-token KL (nats/token), or 1 − cosine for encoders."),
    only: List[str] = typer.Option([], "--only", help="Convert only modules whose name matches (glob or substring); repeatable."),
    exclude: List[str] = typer.Option([], "--exclude", help="Skip modules whose name matches; repeatable."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Held-out data: report source vs converted (perplexity, top-1, or embedding agreement)."),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Tokens of --eval text to score."),
    text_field: str = typer.Option("text", help="Field of .jsonl records holding the text."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype (float32, bfloat16, float16); default: the source's."),
    weights: Optional[str] = typer.Option(None, help="timm:NAME only: a .safetensors state dict."),
    random_weights: bool = typer.Option(False, "--random-weights", help="timm:NAME only: random initialisation (no download)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled .bin/.pt checkpoints (they can run code)."),
    shard_size: str = typer.Option("5GB", help="Maximum safetensors shard size."),
    stream: str = typer.Option("auto", help="auto|always|never: convert block by block from the shards (models larger than memory)."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N: where a model held whole in memory runs calibration and --eval (streamed conversions use a GPU when there is one)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
    layers: bool = typer.Option(False, "--layers", help="Print every converted layer (always in --json and the manifest)."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Replace every normalization layer with a calibrated IBNorm layer and write the converted checkpoint."""
    with user_errors():
        quiet_libraries()
        import ibnorm
        from ibnorm.compression import get_op
        from ibnorm.errors import IBNormError

        get_op(op) if op in ibnorm.COMPRESSION_OPS else _bad("--op", op, ibnorm.COMPRESSION_OPS)
        if grouping not in ibnorm.GROUPING_CHOICES:
            _bad("--grouping", grouping, ibnorm.GROUPING_CHOICES)
        if lam is not None and lam < 0:
            raise IBNormError("--lam must be ≥ 0")
        if out is None:
            from ibnorm.io.sources import default_output_name

            out = Path(default_output_name(source))
            if not json_out:
                console.print(f"writing to ./{out} (choose with --out)")
        opts = ibnorm.ConvertOptions(grouping=grouping, op=op, lam=lam, only=only, exclude=exclude, calib=calib,
                                     calib_samples=calib_samples, seq_len=seq_len, tolerance=tolerance, budget=budget,
                                     text_field=text_field)
        with stage_progress(not json_out) as progress:
            result, manifest = ibnorm.convert_checkpoint(
                source, out, opts, allow_pickle=allow_pickle, weights=weights, pretrained=not random_weights,
                dtype=_dtype(dtype), eval_data=eval_data, eval_tokens=eval_tokens, shard_size=shard_size, force=force,
                progress=progress, stream=stream, device=device)
    if json_out:
        print_json(manifest)
        return
    render_conversion(manifest, out, layers)


def _bad(option: str, value: str, choices) -> None:
    from ibnorm.errors import IBNormError

    raise IBNormError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")


def inspect(
    path: Path = typer.Argument(..., help="A .safetensors file, a (sharded or converted) model directory, or a .gguf file."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    layers: bool = typer.Option(False, "--layers", help="List every norm layer (and its λ for converted checkpoints)."),
) -> None:
    """Describe a checkpoint from its headers, without loading it."""
    with user_errors():
        from ibnorm.inspect import inspect_checkpoint

        info = inspect_checkpoint(path)
    if json_out:
        print_json(info)
        if info["problems"]:
            raise typer.Exit(1)
        return
    console.print(pairs("checkpoint", _checkpoint_rows(info)))
    if layers:
        per = ((info.get("lambda") or {}).get("per_layer", {}))
        short = short_names(info["norm_layer_names"])
        rows = [(short[n], *(per[n][k] for k in ("mean", "min", "max"))) if n in per else (short[n], None, None, None)
                for n in info["norm_layer_names"]]
        console.print(table("norm layers", ("layer", "λ mean", "λ min", "λ max"), rows, numeric=(1, 2, 3)))
    for p in info["problems"]:
        console.print(f"[red]problem:[/red] {p}")
    if info["problems"]:
        raise typer.Exit(1)


def _checkpoint_rows(info: dict) -> list[tuple[str, str]]:
    rows = [("path", info["path"]), ("files", info["files"]), ("tensors", info["tensors"]),
            ("parameters", f"{info['parameters']:,}"), ("bytes", f"{info['bytes']:,}"),
            ("dtypes", ", ".join(f"{d}: {v['tensors']}" for d, v in info["dtypes"].items())),
            ("norm layers", info["norm_layers"])]
    lam = info.get("lambda")
    if lam:
        rows.append(("λ", f"{lam['layers']} layers, mean {num(lam['mean'])}, range {num(lam['min'])}–{num(lam['max'])}, "
                          f"{pct(lam['frac_ge_0_1'])} ≥ 0.1, {pct(lam['frac_zero'])} = 0"))
    m = info.get("manifest")
    if m:
        rows.append(("converted from", f"{m['source']['name']} ({m['source']['resolved']})"))
        rows.append(("calibration", m["calibration"]["mode"] + (f" on {m['calibration'].get('data')}" if m["calibration"].get("data") else "")))
        if m.get("evaluation"):
            rows.append((m["evaluation"]["metric"], f"source {m['evaluation']['source']:.4g} → converted {m['evaluation']['converted']:.4g}"))
        if m.get("finetune"):
            ft = m["finetune"]
            rows.append(("fine-tune", f"{ft.get('steps')} steps on {ft.get('data')}, final {ft.get('final')}"))
    return rows


def eval_command(
    path: str = typer.Argument(..., help="A converted directory, or any source convert accepts."),
    data: str = typer.Option(..., "--data", help="Text (file, dir, .jsonl, builtin:pydoc:eval) or an image folder."),
    compare: Optional[str] = typer.Option(None, "--compare", help="A second model to evaluate on the same data."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Perplexity window in tokens, windows overlap by half (default: 512, or the model's positions if fewer)."),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", help="Tokens of text to score."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", hidden=True),  # the old name of --eval-tokens
    text_field: str = typer.Option("text", help="Field of .jsonl records holding the text."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Perplexity (causal LMs), top-1 accuracy (image classifiers) or embedding agreement (encoders, with --compare)."""
    with user_errors():
        quiet_libraries()
        from ibnorm.evaluate import check_comparable
        from ibnorm.evaluate import compare as compare_results
        from ibnorm.evaluate import evaluate_model
        from ibnorm.loading import open_model

        eval_tokens = eval_tokens if max_tokens is None else max_tokens
        first = open_model(path)
        second = open_model(compare) if compare else None
        if second is not None:
            check_comparable(first.task, second.task, path, compare)
        res_a = evaluate_model(first, first.model, data, seq_len, eval_tokens, text_field)
        result = {"model": path, "data": data, "task": first.task, **{k: v for k, v in res_a.items() if not k.startswith("_")}}
        if second is not None:
            res_b = evaluate_model(second, second.model, data, seq_len, eval_tokens, text_field)
            both = compare_results(dict(res_b), dict(res_a))
            result = {"model": path, "compare": compare, "data": data, "task": first.task, **both}
        elif res_a["metric"] == "embedding":
            result["note"] = "embeddings have no absolute score: pass --compare SOURCE for agreement"
    if json_out:
        print_json(result)
        return
    rows = [("model", path)]
    if compare:
        delta = f" ({100 * result['relative_change']:+.2f}%)" if "relative_change" in result else ""
        rows += [("compared with", compare), (result["metric"], f"{result['source']:.4g} ({compare}) → {result['converted']:.4g}{delta}")]
    else:
        rows.append((result["metric"], result.get("value")))
        rows += [(k, result[k]) for k in ("tokens", "images", "note") if k in result]
    if "window" in result:
        rows.append(("window", f"{result['window']} tokens, stride {result['stride']}: each token scored once"))
    console.print(pairs(f"eval on {data}", rows))
