"""One-shot pruning baselines as pure tensor functions: magnitude, Wanda and SparseGPT.

Every function takes one layer's dense weight (rows, cols) and returns masks that satisfy the
pattern exactly (`icbs.masks`): ties are broken by position, never by a threshold test.
"""

from __future__ import annotations

import logging

import torch

from .masks import Pattern, check_shape, check_sparsity, mask_from_scores, parse_pattern

logger = logging.getLogger(__name__)


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern | str) -> torch.Tensor:
    """Keep-mask pruning the smallest |w| in every group of the pattern."""
    return mask_from_scores(weight.abs(), check_sparsity(sparsity), pattern)


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |w_rc| * ||x_c|| (float32, shaped like the weight)."""
    if column_norms.shape != (weight.shape[1],):
        raise ValueError(f"column_norms has shape {tuple(column_norms.shape)}, expected "
                         f"({weight.shape[1]},)")
    return weight.abs().float() * column_norms.to(weight.device, torch.float32).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float,
               pattern: Pattern | str) -> torch.Tensor:
    """Wanda (Sun et al. 2023): prune the smallest |w_rc| * ||x_c|| in every group."""
    return mask_from_scores(wanda_scores(weight, column_norms), check_sparsity(sparsity),
                            pattern)


def damped_cholesky_inverse(hessian: torch.Tensor, percdamp: float,
                            retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H).

    When the factorization fails the damping is multiplied by 10 (at least 1e-4 * mean(diag H))
    and the factorization retried.
    """
    h = hessian.double()
    mean_diag = torch.diagonal(h).mean().clamp_min(1e-12)
    damp = percdamp * mean_diag
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(retries):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper.float()
        logger.warning("Cholesky failed with damping %.3g; retrying with 10x more", float(damp))
        damp = torch.maximum(damp * 10, 1e-4 * mean_diag)
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with heavy damping")


def _block_prune_counts(pattern: Pattern, sparsity: float, rows: int, i1: int, i2: int) -> int:
    """Weights to prune in columns [i1, i2): per row (per_output) or in total (unstructured).

    Cumulative rounding makes the blocks add up to exactly the pattern's count for the layer.
    """
    if pattern.kind == "per_output":
        return round(sparsity * i2) - round(sparsity * i1)
    return round(sparsity * rows * i2) - round(sparsity * rows * i1)


def _checked(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
             pattern: Pattern | str) -> tuple[Pattern, float]:
    """The parsed pattern and sparsity of a Hessian-based method; raises on a bad shape."""
    pattern = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity)
    cols = weight.shape[1]
    check_shape(tuple(weight.shape), pattern)
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    return pattern, sparsity


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    pattern: Pattern | str, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight updates, column block by block.

    `hessian` is X X^T / tokens of the layer's inputs. The mask of each column block is chosen
    from w^2 / [H^-1]_cc^2 of the weights as updated so far (across the block for
    `unstructured`, per row for `per_output`, per group of M inputs for N:M). Returns the
    pruned, updated weights (float32) and the keep-mask.
    """
    pattern, sparsity = _checked(weight, hessian, sparsity, pattern)
    rows, cols = weight.shape
    if pattern.kind == "nm" and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} is not a multiple of M={pattern.m}")
    w = weight.detach().clone().float()
    h = hessian.detach().clone().float().to(w.device)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = damped_cholesky_inverse(h, percdamp)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(hinv1)
        err1 = torch.zeros_like(w1)
        if pattern.kind != "nm":
            k = _block_prune_counts(pattern, sparsity, rows, i1, i2)
            block_sparsity = k / (i2 - i1) if pattern.kind == "per_output" else k / w1.numel()
            keep[:, i1:i2] = mask_from_scores(w1 ** 2 / d.unsqueeze(0) ** 2, block_sparsity,
                                              pattern)
        for i in range(i2 - i1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                scores = w1[:, i:i + pattern.m] ** 2 / d[i:i + pattern.m].unsqueeze(0) ** 2
                keep[:, i1 + i:i1 + i + pattern.m] = mask_from_scores(scores, sparsity, pattern)
            q = w1[:, i] * keep[:, i1 + i]
            err = (w1[:, i] - q) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, keep


def alps_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
               pattern: Pattern | str, *, admm_damp: float = 0.01, rho0: float = 0.1,
               max_iter: int = 300, update_every: int = 3,
               damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """ALPS (Meng et al. 2024): ADMM over weights and support, then a refit on the support.

    Minimizes each row's (w - w0)^T (H + lambda I) (w - w0) subject to the pattern's counts,
    lambda = `admm_damp` * mean(diag H), by ADMM with the splitting W = D:
      W-step  W = (H + lambda I + rho I)^-1 ((H + lambda I) w0 - V + rho D), all rows at once
              through one eigendecomposition of H + lambda I, so each new rho costs a product;
      D-step  D = W + V / rho with all but the largest |.| of every pattern group set to zero;
      V-step  V += rho (W - D).
    rho starts at `rho0` * mean(diag H) and grows every `update_every` iterations by 1.3x,
    1.2x or 1.1x as the support moved in that time by >= 10%, >= 0.5% or less of the kept
    count; the iteration stops when the support has not moved for one such period and
    W = D to 1e-4 (relative), or after `max_iter` iterations. The kept weights of the final
    support are then refit by preconditioned conjugate gradients (`least_squares_update`,
    damping `damp`). Returns the pruned weights (float32) and the keep-mask.
    """
    from .reconstruct import least_squares_update

    pattern, sparsity = _checked(weight, hessian, sparsity, pattern)
    cols = weight.shape[1]
    if not bool(torch.isfinite(hessian).all() and torch.isfinite(weight).all()):
        raise ValueError("alps_prune: the weights or the input statistics (H) are not finite")
    w0 = weight.detach().double()
    h = hessian.detach().double().to(w0.device)
    mean_diag = torch.diagonal(h).mean().clamp_min(1e-12)
    h_ridge = h + admm_damp * mean_diag * torch.eye(cols, dtype=h.dtype, device=h.device)
    eigenvalues, basis = (t.float() for t in torch.linalg.eigh(h_ridge))
    # The iteration runs in float32: half the time of float64, and on SmolLM2's layers a
    # post-refit error within 3e-4 (relative) of it; the decomposition stays float64.
    target = (w0 @ h_ridge).float()  # row r: ((H + lambda I) w0_r)^T
    rho = rho0 * float(mean_diag)
    mask = mask_from_scores(w0.abs(), sparsity, pattern)
    d = w0.float() * mask
    v = torch.zeros_like(d)
    kept = int(mask.sum())
    previous = mask
    for it in range(1, max_iter + 1):
        w = ((target - v + rho * d) @ basis) / (eigenvalues + rho) @ basis.T
        z = w + v / rho
        mask = mask_from_scores(z.abs(), sparsity, pattern)
        d = z * mask
        v += rho * (w - d)
        if it % update_every == 0:
            moved = int((mask != previous).sum()) // 2
            converged = moved == 0 and float((w - d).norm()) <= 1e-4 * float(d.norm())
            if converged:
                break
            rho *= 1.3 if moved >= 0.1 * kept else 1.2 if moved >= 0.005 * kept else 1.1
            previous = mask
    refit = least_squares_update(weight.float(), hessian.float(), mask, damp=damp, start=d)
    return refit * mask, mask
