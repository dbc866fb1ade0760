"""Estimators of a block's gradient g_B and Hessian H_BB (see DESIGN: "The block objective"),
one module each, found by name through the registry in `base`.

Every estimator answers `block(layer, idx)` for flat indices `idx` into the layer's weight
matrix, in torch on the layer's device, with H exactly symmetric (callers must not modify
it: it may be a cached tensor), and `objective()` for the value it models.

- `layerwise`: the layer's reconstruction error sum_rows (w - w0)^T H (w - w0) with
  H = X X^T / tokens from calibration inputs; exactly quadratic, rows uncoupled.
- `fisher`: the model's calibration loss; g = mean per-sample gradient, H = empirical Fisher
  G^T G / S, G gathered for the block's entries only from hooked inputs and output gradients.
- `exact`: the autograd gradient and Hessian of the loss restricted to the block.
"""

from icbs.estimators.base import (
    Estimator,
    EstimatorContext,
    available_estimators,
    get_estimator,
    register_estimator,
)
from icbs.estimators.exact import ExactEstimator
from icbs.estimators.fisher import FisherEstimator
from icbs.estimators.layerwise import LayerwiseEstimator

__all__ = ["Estimator", "EstimatorContext", "ExactEstimator", "FisherEstimator",
           "LayerwiseEstimator", "available_estimators", "get_estimator", "register_estimator"]
