"""Least-squares reconstruction of the kept weights of a pruned layer (layerwise objective)."""

from __future__ import annotations

import torch


def reconstruction_error(weight0: torch.Tensor, weight: torch.Tensor,
                         hessian: torch.Tensor) -> torch.Tensor:
    """Per-row error (w - w0)^T H (w - w0), float64, shape (rows,)."""
    d = (weight.double() - weight0.double())
    return ((d @ hessian.double()) * d).sum(dim=1)


def least_squares_update(weight0: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                         damp: float = 0.01) -> torch.Tensor:
    """Weights on `mask` minimizing each row's (w0 - w)^T (H + lambda I) (w0 - w), pruned = 0.

    lambda = damp * mean(diag H). Row r solves H_KK w_K = (H w0)_K on its kept set K by Cholesky
    in float32 (float64 least squares where an undamped system is singular); rows are solved in
    batches, kept sets padded to the longest with identity rows. Returns float32 weights.
    """
    if mask.shape != weight0.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight0.shape)}")
    rows, cols = weight0.shape
    h = hessian.double().to(weight0.device)
    h = h + damp * torch.diagonal(h).mean().clamp_min(1e-12) * torch.eye(
        cols, dtype=h.dtype, device=h.device)
    rhs = (weight0.double() @ h).float()  # row r: (H w0_r)^T, H symmetric
    h = h.float()
    counts = mask.sum(dim=1)
    width = int(counts.max())
    out = torch.zeros(rows, cols, device=weight0.device)
    if width == 0:
        return out
    # kept columns first, in index order; padding positions are pruned columns
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    pad = torch.arange(width, device=mask.device).unsqueeze(0) >= counts.unsqueeze(1)
    eye = torch.eye(width, device=h.device)
    chunk = max(1, 2 ** 25 // width ** 2)  # about 128 MiB of systems per batch
    for r1 in range(0, rows, chunk):
        idx, p = order[r1:r1 + chunk], pad[r1:r1 + chunk]
        a = h[idx.unsqueeze(2), idx.unsqueeze(1)]
        a = a.masked_fill(p.unsqueeze(2) | p.unsqueeze(1), 0) + eye * p.unsqueeze(2)
        b = torch.gather(rhs[r1:r1 + chunk], 1, idx).masked_fill(p, 0).unsqueeze(2)
        chol, info = torch.linalg.cholesky_ex(a)
        sol = torch.cholesky_solve(b, chol)
        failed = info != 0
        if failed.any():  # singular without damping: least squares in float64
            fix = torch.linalg.lstsq(a[failed].double(), b[failed].double()).solution
            sol[failed] = fix.float()
        out[r1:r1 + chunk].scatter_(1, idx, sol.squeeze(2).masked_fill(p, 0))
    return out

def reconstruct_rows(weight0: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
                     mask: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Least-squares update of the kept weights, keeping each row's update only where it lowers
    that row's undamped error, so the layer's error never increases."""
    new = least_squares_update(weight0, hessian, mask, damp)
    better = reconstruction_error(weight0, new, hessian) < reconstruction_error(
        weight0, weight, hessian)
    return torch.where(better.unsqueeze(1), new, weight.float())
