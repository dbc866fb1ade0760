"""ALPS against a slow, straightforward transcription of its iteration, and against SparseGPT."""

import numpy as np
import pytest
import torch

from icbs.baselines import alps_prune, sparsegpt_prune
from icbs.masks import mask_matches_pattern, parse_pattern
from icbs.reconstruct import least_squares_update, reconstruction_error


def _layer(rows, cols, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) * 0.3
    x += torch.randn(tokens, cols, generator=gen)
    return torch.randn(rows, cols, generator=gen), x.T @ x / tokens


def _keep_largest(z, sparsity, pattern):
    """Keep-mask of the largest |z| per group, by explicit loops over the groups."""
    rows, cols = z.shape
    keep = np.zeros(z.shape, dtype=bool)
    if pattern == "unstructured":
        order = np.argsort(-np.abs(z).ravel(), kind="stable")
        keep.ravel()[order[:z.size - round(sparsity * z.size)]] = True
    elif pattern == "per_output":
        for r in range(rows):
            keep[r, np.argsort(-np.abs(z[r]), kind="stable")[:cols - round(sparsity * cols)]] = True
    else:
        n, m = map(int, pattern.split(":"))
        for r in range(rows):
            for g in range(0, cols, m):
                keep[r, g + np.argsort(-np.abs(z[r, g:g + m]), kind="stable")[:n]] = True
    return keep


def _slow_alps(w0, h, sparsity, pattern, ridge=0.01, rho0=0.1, max_iter=300, every=3):
    """The ADMM of ALPS row by row with a fresh linear solve per row and iteration."""
    w0, h = w0.double().numpy(), h.double().numpy()
    rows, cols = w0.shape
    lam = ridge * np.mean(np.diag(h))
    hl = h + lam * np.eye(cols)
    rho = rho0 * np.mean(np.diag(h))
    keep = _keep_largest(w0, sparsity, pattern)
    d, v = w0 * keep, np.zeros_like(w0)
    previous, kept = keep, keep.sum()
    for it in range(1, max_iter + 1):
        w = np.stack([np.linalg.solve(hl + rho * np.eye(cols), hl @ w0[r] - v[r] + rho * d[r])
                      for r in range(rows)])
        keep = _keep_largest(w + v / rho, sparsity, pattern)
        d = (w + v / rho) * keep
        v = v + rho * (w - d)
        if it % every == 0:
            moved = (keep != previous).sum() // 2
            if moved == 0 and np.linalg.norm(w - d) <= 1e-4 * np.linalg.norm(d):
                break
            rho *= 1.3 if moved >= 0.1 * kept else 1.2 if moved >= 0.005 * kept else 1.1
            previous = keep
    refit = np.zeros_like(w0)
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(cols)
    for r in range(rows):
        k = np.flatnonzero(keep[r])
        refit[r, k] = np.linalg.solve(hd[np.ix_(k, k)], (hd @ w0[r])[k])
    return refit, keep


@pytest.mark.parametrize("pattern", ["per_output", "unstructured", "2:4"])
def test_alps_equals_a_slow_transcription(pattern):
    w0, h = _layer(rows=6, cols=24, tokens=80, seed=1)
    weight, mask = alps_prune(w0, h, 0.5, pattern)
    slow_weight, slow_mask = _slow_alps(w0, h, 0.5, pattern)
    assert np.array_equal(mask.numpy(), slow_mask)
    np.testing.assert_allclose(weight.numpy(), slow_weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pattern,sparsity", [("per_output", 0.5), ("unstructured", 0.6),
                                              ("2:4", 0.5), ("per_output", 0.7)])
def test_alps_support_beats_sparsegpt_after_refit(pattern, sparsity):
    w0, h = _layer(rows=32, cols=64, tokens=256, seed=2)
    weight, mask = alps_prune(w0, h, sparsity, pattern)
    assert mask_matches_pattern(mask, parse_pattern(pattern), sparsity)
    assert torch.all(weight[~mask] == 0) and torch.isfinite(weight).all()
    sgpt, sgpt_mask = sparsegpt_prune(w0, h, sparsity, pattern, 16, 0.01)
    refit = least_squares_update(w0, h, sgpt_mask, damp=0.01, start=sgpt)
    alps_error = float(reconstruction_error(w0, weight, h).sum())
    assert alps_error < 0.9 * float(reconstruction_error(w0, refit, h).sum())


def test_alps_handles_dead_inputs_and_a_singular_hessian():
    w0, h = _layer(rows=4, cols=16, tokens=6, seed=3)  # rank 6 < 16
    h[:, 3] = h[3, :] = 0  # an input that is always zero
    weight, mask = alps_prune(w0, h, 0.5, "per_output")
    assert torch.isfinite(weight).all() and mask_matches_pattern(mask, parse_pattern(
        "per_output"), 0.5)


def test_alps_with_no_live_input_is_finite_and_refuses_nan_statistics():
    w0 = torch.randn(4, 8)
    weight, mask = alps_prune(w0, torch.zeros(8, 8), 0.5, "per_output")
    assert torch.isfinite(weight).all() and mask_matches_pattern(mask, parse_pattern(
        "per_output"), 0.5)
    h = torch.eye(8)
    h[1, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        alps_prune(w0, h, 0.5, "per_output")
