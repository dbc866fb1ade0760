"""`fisher`: the model's calibration loss; g = mean per-sample gradient, H = empirical Fisher
G^T G / S, G gathered for the block's entries only from hooked inputs and output gradients."""

from __future__ import annotations

import torch
from torch import nn

from icbs.calibration import LayerSignals, LossFn, per_sample_signals
from icbs.estimators.base import EstimatorContext, register_estimator
from icbs.layers import PrunableLayer


@register_estimator("fisher")
class FisherEstimator:
    """Mean gradient and empirical Fisher of the calibration loss from per-sample gradients.

    The layer inputs and output gradients are captured in one forward/backward pass and
    reused until the model changes; a block step then costs samples x positions x block size.
    """

    @classmethod
    def from_context(cls, context: EstimatorContext) -> FisherEstimator:
        return cls(context.model, context.layers, context.batches, context.loss_fn)

    def __init__(self, model: nn.Module, layers: list[PrunableLayer], batches: list,
                 loss_fn: LossFn):
        self.model, self.layers, self.batches, self.loss_fn = model, layers, batches, loss_fn
        self._signals: dict[str, LayerSignals] | None = None
        self._loss = float("nan")

    def _refresh(self) -> None:
        if self._signals is None:
            self._signals, self._loss = per_sample_signals(
                self.model, self.layers, self.batches, self.loss_fn)

    def per_sample_gradients(self, layer: PrunableLayer, idx: torch.Tensor) -> torch.Tensor:
        """G (samples, block): per-sample loss gradients of the block's weights."""
        self._refresh()
        s = self._signals[layer.name]
        cols = layer.shape[1]
        return torch.einsum("stb,stb->sb", s.delta[:, :, idx // cols], s.x[:, :, idx % cols])

    def block(self, layer: PrunableLayer, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        G = self.per_sample_gradients(layer, idx)
        H = (G.T @ G).double() / G.shape[0]
        return G.double().mean(0), 0.5 * (H + H.T)

    def objective(self, layers: list[PrunableLayer]) -> float:
        self._refresh()
        return self._loss

    def changed(self) -> None:
        self._signals = None
