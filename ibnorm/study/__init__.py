"""``ibnorm study``: train small models from scratch with each normalizer under one recipe."""

from __future__ import annotations

from .normalizers import NORMALIZERS, DyT, apply_normalizer
from .presets import PRESETS, Preset, get_preset
from .report import summarize, write_report
from .runner import StudyError, plan, run_study

__all__ = ["NORMALIZERS", "DyT", "apply_normalizer", "PRESETS", "Preset", "get_preset", "summarize", "write_report",
           "StudyError", "plan", "run_study"]
