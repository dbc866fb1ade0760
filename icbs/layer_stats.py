"""Second-moment statistics of a linear layer's inputs, accumulated batch by batch."""

from __future__ import annotations

import torch


class InputCovariance:
    """The sum of x x^T over the input vectors of one layer and their count (float32 or
    better); `hessian` divides the two.

    `hessian` is H = X X^T / tokens, the Hessian (up to the factor 2) of the layer's mean
    reconstruction error |W0 X - W X|^2 / tokens; its diagonal gives Wanda's ||x_col||^2 / tokens.
    With `groups` > 1 (a grouped convolution) it holds one sum per group; `split` gives them
    as separate covariances.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, groups: int = 1):
        shape = (columns, columns) if groups == 1 else (groups, columns, columns)
        self.sum = torch.zeros(*shape, device=device, dtype=dtype)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add input vectors; `x` has the layer's input width (times the groups, one group's
        columns after the other) as its last dimension."""
        if self.sum.ndim == 3:  # one sum per group, in one batched product
            groups, cols = self.sum.shape[:2]
            x = x.reshape(-1, groups, cols).to(self.sum.dtype).transpose(0, 1)
            self.sum.baddbmm_(x.transpose(1, 2), x)
            self.tokens += x.shape[1]
            return
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def split(self) -> list[InputCovariance]:
        """One covariance per group (views of this one's sums)."""
        parts = []
        for group_sum in self.sum if self.sum.ndim == 3 else [self.sum]:
            part = InputCovariance(0, self.sum.device, self.sum.dtype)
            part.sum, part.tokens = group_sum, self.tokens
            parts.append(part)
        return parts

    @property
    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.sum / self.tokens

    def column_norms(self) -> torch.Tensor:
        """sqrt(mean x_c^2) per input column: Wanda's ||x_c|| up to a constant factor."""
        return torch.sqrt(torch.diagonal(self.hessian).clamp_min(0))
