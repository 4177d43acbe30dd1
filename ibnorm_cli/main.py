"""The ``ibnorm`` command.  Parses arguments, calls the library, renders with rich."""

from __future__ import annotations

from typing import Optional

import typer

import ibnorm

from .render import console

app = typer.Typer(
    name="ibnorm",
    help="Replace the normalization layers of pretrained models with calibrated IBNorm layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"ibnorm {ibnorm.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """ibnorm: model surgery with IBNorm."""


from . import clean_cmd, commands, export_cmd, finetune_cmd, science_cmd, upgrade_cmd  # noqa: E402,F401  register the commands
