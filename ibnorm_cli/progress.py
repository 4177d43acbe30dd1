"""A rich progress display driven by the library's ``progress(stage, done, total)`` callback."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .render import err_console


@contextmanager
def stage_progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    if not enabled or not err_console.is_terminal:
        yield lambda *_: None
        return
    import psutil

    process = psutil.Process()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("[dim]{task.fields[memory]}"))
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            memory = f"RSS {process.memory_info().rss / 2**30:.2f} GiB"
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, memory=memory)
            bar.update(tasks[stage], completed=done, total=total, memory=memory)

        yield update
