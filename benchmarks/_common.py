"""Shared by the benchmark scripts: timing, machine description, saving the table."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def time_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 7, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def save_markdown(path: str, title: str, columns: list[str], rows: list[list[str]]) -> None:
    lines = [f"# {title}", "", f"command: `{command()}`", "", f"machine: {machine()}", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def print_and_save(path: str, title: str, columns: list[str], rows: list[list[str]], width: int = 220) -> None:
    """Print the results as a rich table (with the command and machine) and save them as markdown."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=f"{command()}\n{machine()}")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*r)
    Console(width=width).print(table)
    save_markdown(path, title, columns, rows)
    print(f"saved {path}")


# One timed forward over calibration tokens, as ``convert`` batches them, in a fresh process:
#   python -c FORWARD_SCRIPT SOURCE CALIB SAMPLES SEQ_LEN BATCH_SIZE REPEATS  → JSON {load_s, forward_s, tokens}
FORWARD_SCRIPT = r"""
import json, sys, time
t = time.perf_counter()
import torch
from ibnorm.io.sources import load_source
from ibnorm.data import read_texts, token_examples
src = load_source(sys.argv[1])
load_s = time.perf_counter() - t
ids = token_examples(src.tokenizer, read_texts(sys.argv[2]), int(sys.argv[4]), int(sys.argv[3]))
bs = int(sys.argv[5])
times = []
with torch.no_grad():
    for _ in range(int(sys.argv[6])):
        t = time.perf_counter()
        for i in range(0, len(ids), bs):
            src.model(input_ids=ids[i:i + bs], use_cache=False)
        times.append(time.perf_counter() - t)
print(json.dumps({"load_s": load_s, "forward_s": min(times), "tokens": int(ids.numel())}))
"""
