"""``ibnorm upgrade``: rewrite a converted directory of the first format into the current one."""

from __future__ import annotations

from pathlib import Path

import typer

from .render import console, print_json, quiet_libraries, user_errors


def upgrade(
    directory: Path = typer.Argument(..., help="A directory written by `ibnorm convert` (format ibnorm-converted/1)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Rewrite an old converted directory in place (atomically) so transformers reads it as its own architecture."""
    with user_errors():
        quiet_libraries()
        from ibnorm.hf import upgrade as upgrade_dir

        result = upgrade_dir(directory)
    if json_out:
        print_json(result)
    elif not result["changed"]:
        console.print(f"{directory}: {result['reason']} ({result['format']}); nothing to do")
    else:
        console.print(f"{directory}: {result['from']} → {result['format']} ({result['family']}, "
                      f"{result['model_type']}, {result['layers']} IBNorm layers)")
