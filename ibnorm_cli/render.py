"""Rendering helpers shared by the commands: tables, JSON, one-line errors."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    return t


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def quiet_libraries() -> None:
    """ibnorm shows its own progress: silence the bars and advisories of the libraries it drives."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into one red line and a non-zero exit code."""
    from ibnorm.errors import IBNormError

    try:
        yield
    except IBNormError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        err_console.print(f"[red]error:[/red] {e.strerror or e}: {e.filename}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None
