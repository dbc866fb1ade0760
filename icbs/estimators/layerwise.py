"""`layerwise`: the layer's reconstruction error sum_rows (w - w0)^T H (w - w0) with
H = X X^T / tokens from calibration inputs; exactly quadratic, rows uncoupled."""

from __future__ import annotations

import torch

from icbs.estimators.base import EstimatorContext, register_estimator
from icbs.layers import PrunableLayer


@register_estimator("layerwise")
class LayerwiseEstimator:
    """Reconstruction error of each layer on its calibration inputs (exact, gamma = 1)."""

    @classmethod
    def from_context(cls, context: EstimatorContext) -> LayerwiseEstimator:
        return cls({name: s.hessian for name, s in context.input_statistics().items()})

    def __init__(self, hessians: dict[str, torch.Tensor]):
        # per layer: the objective's Hessian 2 X X^T / tokens, once, in float64 and exactly
        # symmetric, so that a whole-row block uses it as it is
        self.curvature = {name: (H.double() + H.double().T) for name, H in hessians.items()}

    def block(self, layer: PrunableLayer, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H2 = self.curvature[layer.name]
        cols = layer.shape[1]
        r, c = idx // cols, idx % cols
        rows, row_of = torch.unique(r, return_inverse=True)
        diff = (layer.weight[rows] * layer.mask[rows] - layer.w0[rows]).double()
        g = (diff @ H2)[row_of, c]
        if len(rows) == 1 and len(c) == cols:  # one whole row, in column order
            return g, H2
        H = H2.index_select(0, c).index_select(1, c)
        if len(rows) > 1:  # rows are not coupled
            H *= r.unsqueeze(1) == r.unsqueeze(0)
        return g, H

    def layer_error(self, layer: PrunableLayer) -> float:
        """sum over rows of (w - w0)^T (X X^T / tokens) (w - w0)."""
        diff = (layer.pruned_weight() - layer.w0).double()
        return float(0.5 * ((diff @ self.curvature[layer.name]) * diff).sum())

    def objective(self, layers: list[PrunableLayer]) -> float:
        return sum(self.layer_error(layer) for layer in layers)

    def changed(self) -> None:
        """Nothing is cached: the gradient is recomputed from the current weights."""
