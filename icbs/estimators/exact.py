"""`exact`: the autograd gradient and Hessian of the calibration loss restricted to the block
(a reference for small models: one Hessian costs block-size backward passes)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from icbs.calibration import LossFn, mean_loss
from icbs.estimators.base import EstimatorContext, register_estimator
from icbs.layers import PrunableLayer


@register_estimator("exact")
class ExactEstimator:
    """Autograd gradient and Hessian of the calibration loss in the block's weights."""

    @classmethod
    def from_context(cls, context: EstimatorContext) -> ExactEstimator:
        return cls(context.model, context.batches, context.loss_fn)

    def __init__(self, model: nn.Module, batches: list, loss_fn: LossFn):
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        self._loss: float | None = None

    def _loss_at(self, layer: PrunableLayer, idx: torch.Tensor, values: torch.Tensor):
        weight = layer.pruned_weight().flatten().index_put((idx,), values)
        weight = weight.reshape(layer.module.weight.shape)
        name = layer.name + ".weight" if layer.name else "weight"
        total, count = 0.0, 0
        for inputs, targets in self.batches:
            out = functional_call(self.model, {name: weight}, (inputs,), strict=False)
            total = total + self.loss_fn(out, targets) * len(inputs)
            count += len(inputs)
        return total / count

    def block(self, layer: PrunableLayer, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        current = layer.pruned_weight().flatten()[idx].double()

        def f(values):
            return self._loss_at(layer, idx, values.to(layer.w0.dtype)).double()

        g = torch.autograd.functional.jacobian(f, current)
        H = torch.autograd.functional.hessian(f, current)
        return g, 0.5 * (H + H.T)

    def objective(self, layers: list[PrunableLayer]) -> float:
        if self._loss is None:
            self._loss = mean_loss(self.model, self.batches, self.loss_fn)
        return self._loss

    def changed(self) -> None:
        self._loss = None
