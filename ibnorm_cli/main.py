"""The ``ibnorm`` command: every subcommand is registered here, in workflow order.

The command modules only define functions (they never import this module), so there is no import
circle and ``ibnorm --help`` lists the commands in the order a user needs them.
"""

from __future__ import annotations

from typing import Optional

import typer

import ibnorm

from . import clean_cmd, commands, export_cmd, finetune_cmd, science_cmd, upgrade_cmd
from .render import console

app = typer.Typer(
    name="ibnorm",
    help="Replace the normalization layers of pretrained models with calibrated IBNorm layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (name, function) in workflow order: this list is the order of `ibnorm --help`.
COMMANDS = (
    ("convert", commands.convert),
    ("inspect", commands.inspect),
    ("eval", commands.eval_command),
    ("finetune", finetune_cmd.finetune),
    ("export", export_cmd.export),
    ("study", science_cmd.study),
    ("mi", science_cmd.mi),
    ("upgrade", upgrade_cmd.upgrade),
    ("clean", clean_cmd.clean),
    ("ops", commands.ops_command),
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


for _name, _function in COMMANDS:
    app.command(_name)(_function)
