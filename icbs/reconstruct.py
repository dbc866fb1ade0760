"""Least-squares reconstruction of the kept weights of a pruned layer (layerwise objective)."""

from __future__ import annotations

import torch


def reconstruction_error(weight0: torch.Tensor, weight: torch.Tensor,
                         hessian: torch.Tensor) -> torch.Tensor:
    """Per-row error (w - w0)^T H (w - w0), float64, shape (rows,)."""
    d = (weight.double() - weight0.double())
    return ((d @ hessian.double()) * d).sum(dim=1)


def least_squares_update(weight0: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                         damp: float = 0.01, start: torch.Tensor | None = None,
                         tol: float = 1e-5, max_iter: int | None = None) -> torch.Tensor:
    """Weights on `mask` minimizing each row's (w0 - w)^T (H + lambda I) (w0 - w), pruned = 0.

    lambda = damp * mean(diag H). Row r solves H_KK w_K = (H w0)_K on its kept set K; all rows
    at once by Jacobi-preconditioned conjugate gradients in float32, warm-started from `start`
    (default w0 on the mask), until every row's residual is below `tol` times its right-hand
    side or after `max_iter` iterations (default: the number of columns, CG's exact bound).
    Each iteration costs one (rows x cols) @ (cols x cols) product over the rows not yet
    converged, so a warm start at the answer (rows a mask step left alone) costs nothing.
    The system is consistent even where H is singular (H_KK w = H_K: w0 has the normal
    equations' right-hand side), so CG converges without damping too. Returns float32.
    """
    if mask.shape != weight0.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight0.shape)}")
    cols = weight0.shape[1]
    h = hessian.double().to(weight0.device)
    h = (h + damp * torch.diagonal(h).mean().clamp_min(1e-12) * torch.eye(
        cols, dtype=h.dtype, device=h.device)).float()
    keep = mask.to(torch.float32)
    b = (weight0.float() @ h) * keep  # row r: (H w0_r)^T restricted to K, H symmetric
    x = (weight0 if start is None else start).float() * keep
    r = b - (x @ h) * keep
    diag = torch.diagonal(h)
    precondition = torch.where(diag > 0, 1 / diag, torch.ones_like(diag))
    z = r * precondition
    p = z.clone()
    rz = (r * z).sum(dim=1, keepdim=True)
    goal = tol * b.norm(dim=1)
    active = torch.arange(len(x), device=x.device)  # rows not yet converged
    for _ in range(cols if max_iter is None else max_iter):
        going = r.norm(dim=1) > goal
        if not bool(going.all()):  # drop converged rows from the work
            active, r, p, rz, keep, goal = (t[going] for t in (active, r, p, rz, keep, goal))
            if len(active) == 0:
                break
        q = (p @ h) * keep
        pq = (p * q).sum(dim=1, keepdim=True)
        alpha = torch.where(pq > 0, rz / pq, torch.zeros_like(pq))
        x.index_add_(0, active, alpha * p)
        r -= alpha * q
        z = r * precondition
        rz_next = (r * z).sum(dim=1, keepdim=True)
        p = z + torch.where(rz > 0, rz_next / rz, torch.zeros_like(rz)) * p
        rz = rz_next
    return x


def reconstruct_rows(weight0: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
                     mask: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Least-squares update of the kept weights, warm-started from `weight`, keeping each row's
    update only where it lowers that row's undamped error, so the layer's error never
    increases."""
    new = least_squares_update(weight0, hessian, mask, damp, start=weight)
    better = reconstruction_error(weight0, new, hessian) < reconstruction_error(
        weight0, weight, hessian)
    return torch.where(better.unsqueeze(1), new, weight.float())
