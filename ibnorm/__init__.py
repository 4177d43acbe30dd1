"""ibnorm — replace the normalization layers of pretrained models with calibrated IBNorm layers."""

__version__ = "0.1.0"

from . import errors, functional
from .compression import COMPRESSION_OPS, compress
from .layers import (
    VARIANTS,
    IBBatchNorm,
    IBBatchNorm1d,
    IBBatchNorm2d,
    IBBatchNorm3d,
    IBGroupNorm,
    IBLayerNorm,
    IBLayerNorm2d,
    IBNormBase,
    IBRMSNorm,
    from_module,
    from_spec,
    project_lambdas,
)
from .recognize import NormSpec, recognize, register_recognizer
from .io.checkpoint import load
from .convert import ConvertOptions, convert_checkpoint, convert_model

__all__ = [
    "__version__",
    "functional",
    "compress",
    "COMPRESSION_OPS",
    "VARIANTS",
    "IBNormBase",
    "IBRMSNorm",
    "IBLayerNorm",
    "IBLayerNorm2d",
    "IBBatchNorm",
    "IBBatchNorm1d",
    "IBBatchNorm2d",
    "IBBatchNorm3d",
    "IBGroupNorm",
    "from_module",
    "from_spec",
    "project_lambdas",
    "NormSpec",
    "recognize",
    "register_recognizer",
    "load",
    "ConvertOptions",
    "convert_model",
    "convert_checkpoint",
]
