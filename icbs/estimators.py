"""Estimators of a block's gradient g_B and Hessian H_BB (see DESIGN: "The block objective").

Every estimator answers `block(layer, idx)` for flat indices `idx` into the layer's weight
matrix, in torch on the layer's device, with H exactly symmetric (callers must not modify
it: it may be a cached tensor), and `objective()` for the value it models.

- `layerwise`: the layer's reconstruction error sum_rows (w - w0)^T H (w - w0) with
  H = X X^T / tokens from calibration inputs; exactly quadratic, rows uncoupled.
- `fisher`: the model's calibration loss; g = mean per-sample gradient, H = empirical Fisher
  G^T G / S, G gathered for the block's entries only from hooked inputs and output gradients.
- `exact`: the autograd gradient and Hessian of the loss restricted to the block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from icbs.calibration import LayerSignals, LossFn, mean_loss, per_sample_signals
from icbs.layers import PrunableLayer


class LayerwiseEstimator:
    """Reconstruction error of each layer on its calibration inputs (exact, gamma = 1)."""

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


class FisherEstimator:
    """Mean gradient and empirical Fisher of the calibration loss from per-sample gradients.

    The layer inputs and output gradients are captured in one forward/backward pass and
    reused until the model changes; a block step then costs samples x positions x block size.
    """


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


class ExactEstimator:
    """Autograd gradient and Hessian of the calibration loss in the block's weights."""

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


ESTIMATORS = ("layerwise", "fisher", "exact")
