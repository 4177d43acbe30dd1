"""Every command's --help renders (rich markup in a help string can raise instead of printing)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ibnorm_cli.main import app

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_commands_are_registered():
    assert {"convert", "inspect", "eval", "finetune", "study", "mi", "export"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_renders(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
