"""Least-squares reconstruction against a direct per-row solve; alternation never hurts."""

import numpy as np
import pytest
import torch

from icbs.baselines import wanda_mask
from icbs.masks import group_ids, mask_matches_pattern, parse_pattern
from icbs.reconstruct import (
    least_squares_update,
    reconstruct_rows,
    reconstruction_error,
)


def _layer(rows=8, cols=24, tokens=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    x = torch.randn(tokens, cols, generator=gen) + torch.randn(1, cols, generator=gen)
    return weight, x.T @ x / tokens


@pytest.mark.parametrize("pattern", ["per_output", "unstructured", "2:4"])
@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_least_squares_matches_direct_per_row_solve(pattern, damp):
    weight, hessian = _layer()
    mask = wanda_mask(weight, torch.diagonal(hessian).sqrt(), 0.6, pattern)
    if pattern == "unstructured":  # uneven rows, one fully pruned and one dense
        mask[0] = False
        mask[1] = True
    new = least_squares_update(weight, hessian, mask, damp=damp, tol=1e-7)
    h = hessian.double().numpy()
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    w0 = weight.double().numpy()
    for r in range(len(w0)):
        kept = np.flatnonzero(mask[r].numpy())
        expected = np.zeros_like(w0[r])
        if len(kept):
            expected[kept] = np.linalg.solve(h[np.ix_(kept, kept)], (h @ w0[r])[kept])
        np.testing.assert_allclose(new[r].numpy(), expected, rtol=1e-3, atol=1e-4)
    assert torch.all(new[~mask] == 0)


def test_default_tolerance_reaches_the_optimal_error_from_any_start():
    weight, hessian = _layer(rows=16, cols=48, tokens=60, seed=5)
    mask = wanda_mask(weight, torch.diagonal(hessian).sqrt(), 0.5, "2:4")
    exact = least_squares_update(weight, hessian, mask, damp=0.01, tol=1e-7)
    best = float(reconstruction_error(weight, exact, hessian).sum())
    far = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    for start in (None, weight * mask, far):
        new = least_squares_update(weight, hessian, mask, damp=0.01, start=start)
        assert torch.all(new[~mask] == 0)
        error = float(reconstruction_error(weight, new, hessian).sum())
        assert error == pytest.approx(best, rel=1e-4)


def _best_swap_step(weight0, weight, hessian, mask, pattern):
    """A plain mask step: per group, the single swap (prune a kept weight, restore a pruned one
    to w0) that lowers the exact error most; groups of one row only."""
    groups = group_ids(tuple(mask.shape), pattern)
    weight, mask = weight.clone(), mask.clone()
    for r in range(mask.shape[0]):
        best = (reconstruction_error(weight0[r:r + 1], weight[r:r + 1], hessian).item(), None)
        for i in range(mask.shape[1]):
            for j in range(mask.shape[1]):
                if mask[r, i] and not mask[r, j] and groups[r, i] == groups[r, j]:
                    trial = weight[r].clone()
                    trial[i], trial[j] = 0, weight0[r, j]
                    err = reconstruction_error(weight0[r:r + 1], trial[None], hessian).item()
                    if err < best[0]:
                        best = (err, (i, j, trial))
        if best[1] is not None:
            i, j, trial = best[1]
            weight[r], mask[r, i], mask[r, j] = trial, False, True
    return weight, mask


@pytest.mark.parametrize("pattern", ["per_output", "2:4"])
def test_alternating_mask_steps_and_updates_never_increase_error(pattern):
    weight0, hessian = _layer(rows=4, cols=16, seed=3)
    pat = parse_pattern(pattern)
    mask = wanda_mask(weight0, torch.diagonal(hessian).sqrt(), 0.5, pat)
    weight = weight0 * mask
    errors = [reconstruction_error(weight0, weight, hessian).sum().item()]
    for _ in range(3):
        weight, mask = _best_swap_step(weight0, weight, hessian, mask, pat)
        errors.append(reconstruction_error(weight0, weight, hessian).sum().item())
        weight = reconstruct_rows(weight0, weight, hessian, mask, damp=0.01)
        errors.append(reconstruction_error(weight0, weight, hessian).sum().item())
        assert mask_matches_pattern(mask, pat, 0.5)
        assert torch.all(weight[~mask] == 0)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.8 * errors[0]


def test_singular_hessian_without_damping_still_converges():
    weight, hessian = _layer(rows=4, cols=16, tokens=5)
    mask = wanda_mask(weight, torch.diagonal(hessian).sqrt(), 0.5, "per_output")
    new = least_squares_update(weight, hessian, mask, damp=0.0, tol=1e-6)
    assert torch.isfinite(new).all()
    h, w0 = hessian.double().numpy(), weight.double().numpy()
    for r in range(len(w0)):  # any least-squares solution of the rank-deficient system
        kept = np.flatnonzero(mask[r].numpy())
        best = np.zeros_like(w0[r])
        best[kept] = np.linalg.lstsq(h[np.ix_(kept, kept)], (h @ w0[r])[kept], rcond=None)[0]
        optimum = (best - w0[r]) @ h @ (best - w0[r])
        assert reconstruction_error(weight[r:r + 1], new[r:r + 1], hessian).item() == \
            pytest.approx(optimum, rel=1e-3, abs=1e-6)
