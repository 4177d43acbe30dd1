"""Choosing λ and refitting the affine of converted norms, from data or from stored statistics."""

from .fit import LAMBDA_GRID, LayerFit, fit_layer, fit_layer_data_free, refit_for_lambda, source_outputs
from .capture import capture_inputs

__all__ = ["LAMBDA_GRID", "LayerFit", "fit_layer", "fit_layer_data_free", "refit_for_lambda", "source_outputs", "capture_inputs"]
