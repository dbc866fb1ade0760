"""Importance scores of weights: the initial masks keep the highest, blocks draw on them."""

from __future__ import annotations

import torch

from icbs.baselines import wanda_scores
from icbs.layer_stats import InputCovariance
from icbs.layers import PrunableLayer

SCORES = ("magnitude", "wanda", "gradient", "random")


def weight_scores(
    kind: str,
    layers: list[PrunableLayer],
    *,
    stats: dict[str, InputCovariance] | None = None,
    gradients: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Scores per layer, shaped like the weight matrix.

    magnitude: |w|; wanda: |w| * ||x_col|| (needs `stats`); gradient: |w * dL/dw| (needs
    `gradients`, the calibration loss's gradient per layer); random: uniform noise.
    """
    if kind == "magnitude":
        return {layer.name: layer.w0.abs() for layer in layers}
    if kind == "wanda":
        return {layer.name: wanda_scores(layer.w0, stats[layer.name].column_norms())
                for layer in layers}
    if kind == "gradient":
        return {layer.name: (layer.w0 * gradients[layer.name]).abs() for layer in layers}
    if kind == "random":
        return {layer.name: torch.rand(layer.shape, generator=generator).to(layer.w0.device)
                for layer in layers}
    raise ValueError(f"unknown score {kind!r}; expected one of {', '.join(SCORES)}")
