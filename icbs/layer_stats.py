"""Second-moment statistics of a linear layer's inputs, accumulated batch by batch."""

from __future__ import annotations

import torch


class InputCovariance:
    """The sum of x x^T over the input vectors of one layer and their count (float32 or
    better); `hessian` divides the two.

    `hessian` is H = X X^T / tokens, the Hessian (up to the factor 2) of the layer's mean
    reconstruction error |W0 X - W X|^2 / tokens; its diagonal gives Wanda's ||x_col||^2 / tokens.
    With `groups` > 1 (a grouped convolution) it holds one sum per group; `split` gives them
    as separate covariances. With `paired`, it also sums x x0^T and x0 x0^T, x0 being the same
    layer's input in the dense model on the same tokens: `cross` then gives G = X X0^T /
    tokens, from which `dense_target` makes the weights whose outputs on the pruned model's
    inputs best match the dense model's outputs, and `dense_output_error` measures how far
    they are from them.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, groups: int = 1, paired: bool = False):
        shape = (columns, columns) if groups == 1 else (groups, columns, columns)
        if paired and groups != 1:
            raise ValueError("paired (dense-target) statistics are for ungrouped layers")
        self.sum = torch.zeros(*shape, device=device, dtype=dtype)
        self.cross_sum = torch.zeros_like(self.sum) if paired else None
        self.dense_sum = torch.zeros_like(self.sum) if paired else None
        self.tokens = 0

    def add_batch(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Add input vectors; `x` has the layer's input width (times the groups, one group's
        columns after the other) as its last dimension. Paired statistics take `dense`, the
        dense model's inputs on the same tokens (same shape)."""
        if (dense is None) == self.paired:
            raise ValueError("paired statistics need the dense inputs with every batch, "
                             "unpaired ones none")
        if self.sum.ndim == 3:  # one sum per group, in one batched product
            groups, cols = self.sum.shape[:2]
            x = x.reshape(-1, groups, cols).to(self.sum.dtype).transpose(0, 1)
            self.sum.baddbmm_(x.transpose(1, 2), x)
            self.tokens += x.shape[1]
            return
        if dense is not None and dense.shape != x.shape:
            raise ValueError(f"dense inputs of shape {tuple(dense.shape)} do not pair with "
                             f"inputs of shape {tuple(x.shape)}")
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.T, x)
        if dense is not None:
            dense = dense.reshape(-1, x.shape[-1]).to(self.sum.dtype)
            self.cross_sum.addmm_(x.T, dense)
            self.dense_sum.addmm_(dense.T, dense)
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

    @property
    def paired(self) -> bool:
        """Whether these statistics are paired with the dense model's inputs."""
        return self.cross_sum is not None

    @property
    def cross(self) -> torch.Tensor | None:
        """G = X X0^T / tokens (paired statistics), else None."""
        return self.cross_sum / self.tokens if self.paired else None

    def column_norms(self) -> torch.Tensor:
        """sqrt(mean x_c^2) per input column: Wanda's ||x_c|| up to a constant factor."""
        return torch.sqrt(torch.diagonal(self.hessian).clamp_min(0))


def dense_output_error(w0: torch.Tensor, weight: torch.Tensor, cov: InputCovariance) -> float:
    """|W X - W0 X0|^2 / tokens summed over the rows (paired statistics; float64): the error
    against the dense model's outputs, comparable between runs whatever their inputs."""
    w, w0 = weight.double(), w0.double()
    h, g, h0 = (t.double() / cov.tokens for t in (cov.sum, cov.cross_sum, cov.dense_sum))
    return float(((w @ h) * w).sum() - 2 * ((w @ g) * w0).sum() + ((w0 @ h0) * w0).sum())


def dense_target(w0: torch.Tensor, cov: InputCovariance, damp: float) -> torch.Tensor:
    """The weights T minimizing |T X - W0 X0|^2 / tokens + lambda |T - W0|^2 (X: the layer's
    inputs in the model pruned so far, X0: in the dense model; lambda = damp mean(diag H)):
    T = W0 (G^T + lambda I) (H + lambda I)^-1. Every row's error |w X - w0 X0|^2 / tokens is
    then (w - t)^T H (w - t) + 2 lambda w.(w0 - t) plus a constant, so any method that prunes
    toward W0 under H prunes toward the dense model's outputs when given T instead (T = W0
    when X = X0), up to the linear term of the ridge, which it does not see."""
    h = cov.hessian.double()
    ridge = damp * float(torch.diagonal(h).mean()) * torch.eye(len(h), dtype=h.dtype,
                                                               device=h.device)
    rhs = (cov.cross.double() + ridge) @ w0.double().T
    try:
        target = torch.linalg.solve(h + ridge, rhs).T
    except torch.linalg.LinAlgError:
        target = torch.full_like(w0.double(), float("nan"))
    if not torch.isfinite(target).all():
        raise ValueError("the dense target is not finite: H + damping is singular; raise "
                         "--target-damp above 0")
    return target.to(w0.dtype)
