"""Second-moment statistics of a linear layer's inputs, accumulated batch by batch."""

from __future__ import annotations

import torch


class InputCovariance:
    """The sum of x x^T over the input vectors of one layer and their count (float32 or
    better); `hessian` divides the two.

    `hessian` is H = X X^T / tokens, the Hessian (up to the factor 2) of the layer's mean
    reconstruction error |W0 X - W X|^2 / tokens; its diagonal gives Wanda's ||x_col||^2 / tokens.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add input vectors; `x` has the layer's input width as its last dimension."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.sum / self.tokens

    def column_norms(self) -> torch.Tensor:
        """sqrt(mean x_c^2) per input column: Wanda's ||x_c|| up to a constant factor."""
        return torch.sqrt(torch.diagonal(self.hessian).clamp_min(0))
