"""Baselines against straightforward (slow) transcriptions of the published algorithms."""

import numpy as np
import pytest
import torch

from icbs.baselines import magnitude_mask, sparsegpt_prune, wanda_mask
from icbs.masks import mask_matches_pattern, parse_pattern


def _layer(rows, cols, tokens=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    x = torch.randn(tokens, cols, generator=gen) * torch.rand(cols, generator=gen) * 3
    x[:, 1] += 2.0  # correlated inputs
    return weight, x.T @ x / tokens


def _slow_keep(scores, prune):
    """Keep-mask pruning the `prune` lowest scores of a 1-D array (stable index tie-break)."""
    keep = np.ones(len(scores), dtype=bool)
    keep[np.argsort(scores, kind="stable")[:prune]] = False
    return keep


def _slow_group_mask(scores, sparsity, pattern):
    """Wanda's sort: per row (per_output), per run of M (N:M) or over the whole layer."""
    rows, cols = scores.shape
    if pattern.kind == "unstructured":
        return _slow_keep(scores.ravel(), round(sparsity * scores.size)).reshape(rows, cols)
    keep = np.ones_like(scores, dtype=bool)
    for r in range(rows):
        if pattern.kind == "per_output":
            keep[r] = _slow_keep(scores[r], round(sparsity * cols))
        else:
            for c in range(0, cols, pattern.m):
                keep[r, c:c + pattern.m] = _slow_keep(scores[r, c:c + pattern.m],
                                                      pattern.m - pattern.n)
    return keep


PATTERNS = ["per_output", "unstructured", "2:4", "4:8"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_wanda_and_magnitude_match_slow_sort(pattern, sparsity):
    weight, hessian = _layer(12, 32)
    norms = torch.sqrt(torch.diagonal(hessian))
    pat = parse_pattern(pattern)
    wanda = wanda_mask(weight, norms, sparsity, pattern)
    expected = _slow_group_mask((weight.abs() * norms).numpy(), sparsity, pat)
    assert np.array_equal(wanda.numpy(), expected)
    magnitude = magnitude_mask(weight, sparsity, pattern)
    assert np.array_equal(magnitude.numpy(), _slow_group_mask(weight.abs().numpy(), sparsity, pat))
    assert mask_matches_pattern(wanda, pat, sparsity)


def _slow_sparsegpt(weight, hessian, sparsity, pattern, blocksize, percdamp):
    """SparseGPT as sequential OBS: column by column, with explicit inverses of the Hessian of
    the not-yet-processed columns (no Cholesky, no lazy batching)."""
    w = weight.double().numpy().copy()
    h = hessian.double().numpy()
    rows, cols = w.shape
    h = h + percdamp * np.mean(np.diag(h)) * np.eye(cols)
    inv_rest = [np.linalg.inv(h[i:, i:]) for i in range(cols)]  # inverse Hessian of cols i..
    saliency_den = np.array([inv_rest[i][0, 0] for i in range(cols)])
    keep = np.ones_like(w, dtype=bool)
    for i in range(cols):
        i1 = i - i % blocksize
        if i == i1 and pattern.kind != "nm":
            i2 = min(i1 + blocksize, cols)
            scores = w[:, i1:i2] ** 2 / saliency_den[i1:i2]
            if pattern.kind == "per_output":
                k = round(sparsity * i2) - round(sparsity * i1)
                keep[:, i1:i2] = _slow_group_mask(scores, k / (i2 - i1), pattern)
            else:
                k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
                keep[:, i1:i2] = _slow_group_mask(scores, k / scores.size, pattern)
        if pattern.kind == "nm" and i % pattern.m == 0:
            scores = w[:, i:i + pattern.m] ** 2 / saliency_den[i:i + pattern.m]
            keep[:, i:i + pattern.m] = _slow_group_mask(scores, 0.5, pattern)
        err = np.where(keep[:, i], 0.0, w[:, i])
        w[:, i:] -= np.outer(err, inv_rest[i][0]) / inv_rest[i][0, 0]
    return w, keep


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("blocksize", [8, 32])
def test_sparsegpt_matches_sequential_obs(pattern, blocksize):
    weight, hessian = _layer(10, 40, seed=1)
    pat = parse_pattern(pattern)
    sparsity = 0.5 if pat.kind == "nm" else 0.6
    new, keep = sparsegpt_prune(weight, hessian, sparsity, pattern, blocksize=blocksize)
    ref_w, ref_keep = _slow_sparsegpt(weight, hessian, sparsity, pat, blocksize, 0.01)
    assert np.array_equal(keep.numpy(), ref_keep)
    assert mask_matches_pattern(keep, pat, sparsity)
    np.testing.assert_allclose(new.numpy(), ref_w, rtol=1e-4, atol=1e-4)
    assert torch.all(new[~keep] == 0)


def test_sparsegpt_beats_magnitude_on_layer_error():
    weight, hessian = _layer(16, 64, seed=2)
    new, keep = sparsegpt_prune(weight, hessian, 0.5, "per_output", blocksize=16)
    masked = weight * magnitude_mask(weight, 0.5, "per_output")

    def error(w):
        d = w - weight
        return float(((d @ hessian) * d).sum())

    assert error(new) < error(masked)


def test_sparsegpt_survives_singular_hessian_and_dead_inputs():
    weight = torch.randn(6, 16)
    x = torch.randn(4, 16)
    x[:, 3] = 0  # a dead input column; 4 tokens make H rank-deficient
    new, keep = sparsegpt_prune(weight, x.T @ x, 0.5, "2:4", blocksize=8, percdamp=0.0)
    assert torch.isfinite(new).all()
    assert mask_matches_pattern(keep, parse_pattern("2:4"), 0.5)


def test_bad_inputs_raise_clear_errors():
    weight, hessian = _layer(4, 12)
    with pytest.raises(ValueError, match="multiple of M"):
        wanda_mask(weight, torch.ones(12), 0.5, "2:8")
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(weight, 1.5, "per_output")
    with pytest.raises(ValueError, match="hessian"):
        sparsegpt_prune(weight, hessian[:4, :4], 0.5, "per_output")
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_prune(weight, hessian, 0.5, "2:4", blocksize=6)
