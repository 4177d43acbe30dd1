"""Builders shared by the validation and fuzz tests: safetensors files with hand-edited headers,
tiny model directories, and the one-error-line assertion for in-process CLI runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file's bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict | list | str | bytes, body: bytes) -> bytes:
    """A safetensors file from any header (dicts are JSON-encoded; bytes are taken as the raw header)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def small_safetensors(path: Path) -> Path:
    """Three tensors of different dtypes, one a norm weight (``model.norm.weight``), written by safetensors itself."""
    g = torch.Generator().manual_seed(0)
    save_file({
        "model.embed.weight": torch.randn(6, 4, generator=g),
        "model.norm.weight": torch.rand(4, generator=g).to(torch.bfloat16) + 0.5,
        "model.proj.weight": torch.randn(4, 4, generator=g).to(torch.float16),
    }, str(path), metadata={"format": "pt"})
    return path


def one_error_line(stderr: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


def run_cli(*args: str):
    """``ibnorm ARGS`` in this process (fast: no interpreter start); returns click's Result."""
    from typer.testing import CliRunner

    from ibnorm_cli.main import app

    return CliRunner().invoke(app, list(args), catch_exceptions=True)


def assert_clean_refusal(result, fragment: str = "") -> str:
    """Non-zero exit, exactly one ``error:`` line on stderr, no exception escaped (= no traceback)."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    line = one_error_line(result.stderr)
    assert fragment in line, line
    return line


def tree(path: Path) -> list[str]:
    """Every entry below ``path`` (relative), hidden ones included."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []
