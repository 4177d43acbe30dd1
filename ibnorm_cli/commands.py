"""Commands that are implemented: each parses options, calls ibnorm, renders."""

from __future__ import annotations

import typer

from .main import app
from .render import console, print_json, table


@app.command("ops")
def ops_command(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the compression operations and groupings ibnorm implements."""
    import ibnorm

    rows = [(op.name, op.paper_name, op.formula) for op in ibnorm.COMPRESSION_OPS.values()]
    if json_out:
        print_json({"ops": [dict(zip(("op", "paper_name", "formula"), r)) for r in rows], "variants": list(ibnorm.VARIANTS)})
        return
    console.print(table("compression operations s_λ(z)", ("op", "paper", "formula"), rows))
    console.print(f"variants: {', '.join(ibnorm.VARIANTS)}")
