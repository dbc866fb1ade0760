"""Refit-aware block steps against brute-force least-squares refits of every mask."""

import itertools

import numpy as np
import pytest
import torch

from icbs.block_qubo import build_block_qubo
from icbs.layerwise import improve_layer
from icbs.masks import group_ids, mask_matches_pattern, parse_pattern
from icbs.reconstruct import reconstruction_error
from icbs.refit_steps import RowRefit, choose_row_block, improve_rows, refit_step
from solvers import get_solver


def _hessian(cols, tokens, seed, ridge=0.01):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen, dtype=torch.float64)
    x = x @ torch.randn(cols, cols, generator=gen, dtype=torch.float64) * 0.5 + x
    h = x.T @ x / tokens
    return h + ridge * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)


def _refit_error(h, w0, keep):
    """The row's error after the least-squares refit of its kept weights, by lstsq."""
    kept = keep.nonzero().squeeze(1)
    w = torch.zeros_like(w0)
    if len(kept):
        w[kept] = torch.linalg.lstsq(h[kept][:, kept], (h @ w0)[kept].unsqueeze(1)).solution[:, 0]
    d = w - w0
    return float(d @ h @ d), w


@pytest.mark.parametrize("pattern", ["per_output", "2:4"])
def test_block_step_values_against_a_lstsq_refit_of_every_feasible_mask(pattern):
    cols = 12
    h = _hessian(cols, 40, seed=1)
    w0 = torch.randn(cols, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    groups = group_ids((1, cols), parse_pattern(pattern))[0]
    row = RowRefit(h, w0, keep)
    assert row.error == pytest.approx(_refit_error(h, w0, keep)[0], rel=1e-12)
    block = torch.arange(8)  # two whole 2:4 groups, or 8 columns of one row group
    fb = row.free_block(block)
    qubo = build_block_qubo(fb.y[fb.block], torch.zeros(8, dtype=torch.float64),
                            torch.zeros(8, dtype=torch.float64), 2 * fb.effective_hessian(),
                            ~keep[fb.block], groups[fb.block])
    checked = 0
    for xs in itertools.product([0, 1], repeat=8):
        x = np.array(xs)
        if not qubo.problem.is_feasible(x):
            continue
        trial = keep.clone()
        trial[fb.block] = torch.as_tensor(x == 0)
        truth = _refit_error(h, w0, trial)[0]
        pruned = torch.as_tensor(np.flatnonzero(x))
        assert fb.exact_error(pruned) == pytest.approx(truth, rel=1e-9, abs=1e-12)
        assert fb.error + qubo.delta(x) >= truth - 1e-9  # the QUBO is an upper bound
        checked += 1
    assert checked == (70 if pattern == "per_output" else 36)


def test_an_applied_step_leaves_the_row_at_the_refit_of_its_new_mask():
    cols = 16
    h = _hessian(cols, 50, seed=3)
    w0 = torch.randn(cols, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    row = RowRefit(h, w0, torch.arange(cols) % 2 == 0)
    fb = row.free_block(torch.tensor([0, 1, 2, 3, 5, 8]))  # kept 0, 2, 8; pruned 1, 3, 5
    pruned = torch.tensor([0, 1, 4])  # positions in fb.block
    expected = fb.exact_error(pruned)
    row.apply(fb, pruned, expected)
    truth, weight = _refit_error(h, w0, row.keep)
    assert int(row.keep.sum()) == 8 and set(fb.block[pruned].tolist()) & set(
        row.kept.tolist()) == set()
    assert row.error == pytest.approx(truth, rel=1e-10)
    torch.testing.assert_close(row.weight, weight, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(row.inv, torch.linalg.inv(h[row.kept][:, row.kept]),
                               rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pattern", ["per_output", "2:4"])
def test_every_accepted_step_lowers_the_true_post_refit_error(pattern):
    cols = 32
    h = _hessian(cols, 48, seed=5)
    w0 = torch.randn(cols, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    groups = group_ids((1, cols), parse_pattern(pattern))[0]
    keep = torch.arange(cols) % 4 < 2  # 2 of every 4 kept
    row = RowRefit(h, w0, keep)
    solver = get_solver("anneal")
    rng = np.random.default_rng(0)
    error, accepted = _refit_error(h, w0, keep)[0], 0
    for step in range(60):
        ok, change = refit_step([row], [choose_row_block(row, groups, 16, rng)], [groups],
                                solver, seed=step)
        truth = _refit_error(h, w0, row.keep)[0]
        assert row.error == pytest.approx(truth, rel=1e-8)
        if ok:
            assert change < 0 and truth == pytest.approx(error + change, rel=1e-8)
            accepted += 1
        else:
            assert truth == pytest.approx(error, rel=1e-12)
        error = truth
        counts = torch.bincount(groups[~row.keep], minlength=int(groups.max()) + 1)
        assert torch.all(counts == torch.bincount(groups[~keep], minlength=len(counts)))
    assert accepted > 0


@pytest.mark.parametrize("pattern", ["per_output", "2:4"])
def test_improve_layer_refit_beats_the_refit_of_its_start(pattern):
    from icbs.baselines import sparsegpt_prune
    from icbs.reconstruct import least_squares_update

    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(8, 32, generator=gen)
    x = torch.randn(96, 32, generator=gen) @ torch.randn(32, 32, generator=gen) * 0.5
    hessian = x.T @ x / len(x)
    weight, mask = sparsegpt_prune(w0, hessian, 0.5, pattern, 16, 0.01)
    start = float(reconstruction_error(w0, least_squares_update(w0, hessian, mask, 0.01,
                                                                tol=1e-8), hessian).sum())
    result = improve_layer(w0, hessian, mask, weight=weight, pattern=pattern, sparsity=0.5,
                           steps=8 * 20, block_size=16, objective="refit", damp=0.01)
    assert mask_matches_pattern(result.mask, parse_pattern(pattern), 0.5)
    assert torch.all(result.weight[~result.mask] == 0) and result.accepted > 0
    assert result.error_after == pytest.approx(
        float(reconstruction_error(w0, result.weight, hessian).sum()), rel=1e-6)
    assert result.error_after < 0.95 * start
    assert result.convergence["rows_visited"] == 8


def test_improve_rows_refits_rows_the_budget_does_not_reach():
    gen = torch.Generator().manual_seed(8)
    w0 = torch.randn(6, 16, generator=gen)
    x = torch.randn(64, 16, generator=gen)
    hessian = (x.T @ x / 64).double()
    mask = torch.rand(6, 16, generator=gen).argsort(1) < 8
    result = improve_rows(w0, hessian, mask, start=w0 * mask, pattern=parse_pattern(
        "per_output"), block_size=8, solver=get_solver("greedy"), seed=0, ridge=0.01,
        steps=2)  # two rows get one step each
    assert result.rows_visited == 2
    h = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(16, dtype=torch.float64)
    for r in range(6):
        truth = _refit_error(h, w0[r].double(), result.mask[r])[1]
        torch.testing.assert_close(result.weight[r].double(), truth, rtol=1e-3, atol=1e-4)


def test_refit_objective_refuses_no_ridge_and_non_finite_statistics():
    w0, hessian = torch.randn(4, 8), torch.eye(8)
    mask = torch.arange(8).repeat(4, 1) < 4
    with pytest.raises(ValueError, match="damp > 0"):
        improve_layer(w0, hessian, mask, pattern="per_output", sparsity=0.5, steps=2,
                      objective="refit", damp=0.0)
    hessian[2, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        improve_layer(w0, hessian, mask, pattern="per_output", sparsity=0.5, steps=2,
                      objective="refit")
    with pytest.raises(ValueError, match="unknown objective"):
        improve_layer(w0, torch.eye(8), mask, pattern="per_output", sparsity=0.5, steps=2,
                      objective="obs")


def test_unstructured_rows_trade_sparsity_and_keep_the_layer_count():
    gen = torch.Generator().manual_seed(9)
    w0 = torch.randn(4, 16, generator=gen) * torch.tensor([[4.0], [1.0], [0.3], [1.0]])
    x = torch.randn(64, 16, generator=gen)
    hessian = (x.T @ x / 64).double()
    mask = torch.arange(16).repeat(4, 1) % 2 == 0  # 8 of 16 in every row
    h = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(16, dtype=torch.float64)
    start = sum(_refit_error(h, w0[r].double(), mask[r])[0] for r in range(4))
    result = improve_rows(w0, hessian, mask, start=w0 * mask, pattern=parse_pattern(
        "unstructured"), block_size=16, solver=get_solver("anneal"), seed=0, ridge=0.01,
        steps=40)
    assert int(result.mask.sum()) == 32 and result.accepted > 0
    kept = result.mask.sum(1)
    assert kept[0] > 8 and kept[2] < 8  # the large row keeps more, the small one less
    final = 0.0
    for r in range(4):
        error, weight = _refit_error(h, w0[r].double(), result.mask[r])
        torch.testing.assert_close(result.weight[r].double(), weight, rtol=1e-4, atol=1e-5)
        final += error
    assert final < start
