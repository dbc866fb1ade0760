"""Re-estimating BatchNorm statistics after pruning.

Pruning a convolution shifts the mean and variance of its outputs, so the running statistics
of the BatchNorm after it no longer normalize them. Re-estimating them on calibration inputs
(as the OBC / ExactOBS line of work does for ResNets) changes no weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable) -> int:
    """Replace every BatchNorm's running mean and variance by their average over the
    `(inputs, targets)` batches (each batch's mean and unbiased variance, weighted equally),
    the rest of the model in eval mode; returns how many BatchNorm layers were reset."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    try:
        for inputs, _ in batches:
            model(inputs)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)
