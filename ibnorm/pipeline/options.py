"""What a conversion is asked to do, and what it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from torch import nn

from ..layers import IBNormBase, grouping_of
from ..surgery import NormSite, SkippedNorm

# (stage, done, total) → None; the CLI draws it as a progress bar.
Progress = Callable[[str, int, int], None]


def no_progress(*_: object) -> None:
    return None


CALIB_SEQ_LEN = 256  # tokens per calibration block unless the model has fewer positions


@dataclass
class ConvertOptions:
    grouping: str = "auto"  # rms | layer | batch | group, or auto (the source's); CLI --grouping (alias --variant)
    op: str = "tanh"
    lam: float | None = None  # fixed λ for every channel; None = calibrate
    only: Sequence[str] = ()
    exclude: Sequence[str] = ()
    calib: str | None = None
    calib_samples: int = 32
    seq_len: int | None = None  # tokens per calibration block; None: min(CALIB_SEQ_LEN, the model's positions)
    tolerance: float = 0.001
    budget: float = 0.01  # end-to-end: mean next-token KL (nats), or 1 − cosine for encoders
    max_rows: int = 4096
    batch_size: int = 4
    text_field: str = "text"
    seed: int = 0

    def record(self) -> dict:
        """The options as the manifest stores them."""
        out = {k: v for k, v in asdict(self).items() if k != "batch_size"}
        out["only"], out["exclude"] = list(self.only), list(self.exclude)
        return out


@dataclass
class LayerRecord:
    name: str
    source_class: str
    new_class: str
    grouping: str
    op: str
    lam_shape: list[int]
    lam_mean: float
    lam_min: float
    lam_max: float
    frac_lam_ge_0_1: float
    frac_lam_zero: float
    error: float
    note: str = ""


def layer_record(site: NormSite, module: IBNormBase, error: float) -> LayerRecord:
    lam = module.effective_lam.float().reshape(-1)
    return LayerRecord(
        site.name, site.spec.source_class, type(module).__name__, grouping_of(module), module.op, list(module.lam.shape),
        float(lam.mean()), float(lam.min()), float(lam.max()), float((lam >= 0.1).float().mean()),
        float((lam == 0).float().mean()), error, site.spec.note,
    )


@dataclass
class ConversionResult:
    model: nn.Module | None  # None when the model was streamed (never whole in memory)
    layers: list[LayerRecord]
    skipped: list[SkippedNorm]
    calibration: dict
    end_to_end: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "layers": [asdict(r) for r in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "calibration": self.calibration,
            "end_to_end": self.end_to_end,
            "seconds": round(self.seconds, 2),
        }
