"""The manifest of a converted checkpoint: its name, format, and reading it (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SourceError

MANIFEST = "ibnorm_manifest.json"
FORMAT = "ibnorm-converted/1"
# The format whose config.json is its own architecture (ibnorm_<base>, shipped code; see ibnorm/hf).
FORMAT_2 = "ibnorm-converted/2"
READABLE_FORMATS = (FORMAT, FORMAT_2)


def read_manifest(path: str | Path) -> dict:
    p = Path(path)
    mf = p / MANIFEST if p.is_dir() else p.parent / MANIFEST
    if not mf.is_file():
        raise SourceError(f"{path} is not an ibnorm conversion (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        raise SourceError(f"{mf} is corrupt (not JSON)") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise SourceError(f"{mf}: unsupported format {manifest.get('format')!r} (expected one of {', '.join(READABLE_FORMATS)})")
    return manifest
