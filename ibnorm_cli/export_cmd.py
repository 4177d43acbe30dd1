"""``ibnorm export DIR --format onnx --out FILE``: a converted model as an ONNX file (formats without IBNorm are refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .progress import stage_progress
from .render import console, print_json, quiet_libraries, user_errors


def export(
    directory: Path = typer.Argument(..., help="A converted model directory (written by `ibnorm convert`)."),
    fmt: str = typer.Option(..., "--format", help="onnx (gguf and other formats that cannot carry IBNorm are refused)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The file to write (e.g. model.onnx)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Export a converted model: causal LMs to logits, sentence-transformers encoders to embeddings (ONNX, no KV cache)."""
    with user_errors():
        from ibnorm.validate import check_export

        plan = check_export(directory, fmt, out, force)
        quiet_libraries()
        from ibnorm.deploy import export_onnx

        with stage_progress(not json_out) as progress:
            result = export_onnx(plan, progress)
    if json_out:
        print_json(result)
        return
    console.print(f"wrote {result['out']} ({result['kind']}: {', '.join(result['inputs'])} → {result['output']}; "
                  f"dynamic batch and sequence; no KV cache; {result['bytes'] / 2**20:.1f} MiB; onnxruntime vs PyTorch "
                  f"{result['self_check_relative_error']:.1e} relative; {result['seconds']} s)")
