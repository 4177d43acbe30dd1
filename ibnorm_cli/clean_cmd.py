"""``ibnorm clean DIR``: remove temporary directories left by killed ibnorm runs."""

from __future__ import annotations

from pathlib import Path

import typer

from .render import console, print_json, table, user_errors


def clean(
    directory: Path = typer.Argument(..., help="The directory that holds outputs (where --out directories were written)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed, remove nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove the .NAME.tmp-PID directories of ibnorm runs that were killed (their process is gone)."""
    with user_errors():
        from ibnorm.io.atomic import clean as clean_directory

        report = clean_directory(directory, dry_run=dry_run)
    if json_out:
        print_json({"directory": str(directory), "dry_run": dry_run, "removed": report.removed,
                    "kept_running": report.kept_running, "freed_bytes": report.freed_bytes})
        return
    verb = "would remove" if dry_run else "removed"
    rows = [(verb, p) for p in report.removed] + [("kept (its process is running)", p) for p in report.kept_running]
    if rows:
        console.print(table(f"temporary directories in {directory}", ("", "path"), rows))
    console.print(f"{verb} {len(report.removed)} stale temporary director{'y' if len(report.removed) == 1 else 'ies'} "
                  f"({report.freed_bytes / 2**20:.1f} MiB)")
