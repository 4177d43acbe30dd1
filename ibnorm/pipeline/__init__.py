"""The conversion pipeline: plan → calibrate → check → write, in memory or streamed (one code path)."""

from .convert import convert_checkpoint, convert_model, run_stages
from .families import ModelFamily, family_of, register_family
from .options import ConversionResult, ConvertOptions, LayerRecord

__all__ = ["convert_checkpoint", "convert_model", "run_stages", "ModelFamily", "family_of", "register_family",
           "ConversionResult", "ConvertOptions", "LayerRecord"]
