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


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    pattern: Pattern | str, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight updates, column block by block.

    `hessian` is X X^T / tokens of the layer's inputs. The mask of each column block is chosen
    from w^2 / [H^-1]_cc^2 of the weights as updated so far (across the block for
    `unstructured`, per row for `per_output`, per group of M inputs for N:M). Returns the
    pruned, updated weights (float32) and the keep-mask.
    """
    pattern = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity)
    rows, cols = weight.shape
    check_shape((rows, cols), pattern)
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
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
