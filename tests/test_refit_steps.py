"""Refit-aware block steps against brute-force least-squares refits of every mask."""

import itertools

import numpy as np
import pytest
import torch

from icbs.block_qubo import build_block_qubo
from icbs.layerwise import improve_layer
from icbs.masks import group_ids, mask_from_scores, mask_matches_pattern, parse_pattern
from icbs.reconstruct import reconstruction_error
from icbs.refit_steps import RowsRefit, choose_blocks, improve_rows, refit_step
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
    row = RowsRefit(h, w0[None], keep[None])
    assert float(row.error[0]) == pytest.approx(_refit_error(h, w0, keep)[0], rel=1e-12)
    block = torch.arange(8)  # two whole 2:4 groups, or 8 columns of one row group
    fb = row.free_blocks(block[None])
    order = fb.block[0]
    qubo = build_block_qubo(fb.y[0, order], torch.zeros(8, dtype=torch.float64),
                            torch.zeros(8, dtype=torch.float64), 2 * fb.effective_hessians()[0],
                            ~keep[order], groups[order])
    checked = 0
    for xs in itertools.product([0, 1], repeat=8):
        x = np.array(xs)
        if not qubo.problem.is_feasible(x):
            continue
        trial = keep.clone()
        trial[order] = torch.as_tensor(x == 0)
        truth = _refit_error(h, w0, trial)[0]
        pruned = torch.as_tensor(np.flatnonzero(x))[None]
        assert float(fb.exact_errors(pruned)[0]) == pytest.approx(truth, rel=1e-9, abs=1e-12)
        assert float(fb.error[0]) + qubo.delta(x) >= truth - 1e-9  # the QUBO is an upper bound
        checked += 1
    assert checked == (70 if pattern == "per_output" else 36)


def test_an_applied_step_leaves_the_rows_at_the_refit_of_their_new_masks():
    cols = 16
    h = _hessian(cols, 50, seed=3)
    w0 = torch.randn(3, cols, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    keep = torch.stack([torch.arange(cols) % 2 == 0, torch.arange(cols) % 2 == 1,
                        torch.arange(cols) < 8])
    rows = RowsRefit(h, w0, keep)
    # per row 3 kept and 3 pruned columns
    fb = rows.free_blocks(torch.tensor([[0, 1, 2, 3, 5, 8], [0, 1, 2, 3, 4, 5],
                                        [0, 1, 2, 8, 9, 10]]))
    pruned = torch.tensor([[0, 1, 4], [0, 1, 2], [2, 3, 5]])  # block positions
    expected = fb.exact_errors(pruned)
    pruned_cols = fb.block[[0, 2]].gather(1, pruned[[0, 2]])
    rows.apply(fb, pruned, expected, torch.tensor([True, False, True]))  # rows 0 and 2
    for r in range(3):
        truth, weight = _refit_error(h, w0[r], rows.keep[r])
        assert int(rows.keep[r].sum()) == 8
        assert float(rows.error[r]) == pytest.approx(truth, rel=1e-10)
        torch.testing.assert_close(rows.weight[r], weight, rtol=1e-8, atol=1e-10)
        kept = rows.kept[r]
        torch.testing.assert_close(rows.inv[r], torch.linalg.inv(h[kept][:, kept]),
                                   rtol=1e-8, atol=1e-10)
    assert torch.equal(rows.keep[1], keep[1])  # not applied: unchanged
    for i, r in enumerate([0, 2]):
        assert not rows.keep[r, pruned_cols[i]].any()


def test_a_batch_steps_its_rows_as_single_row_batches_do():
    cols = 16
    h = _hessian(cols, 50, seed=10)
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(4, cols, generator=gen, dtype=torch.float64)
    keep = torch.rand(4, cols, generator=gen).argsort(1) < 8
    blocks = torch.stack([torch.cat([(~keep[r]).nonzero()[:3, 0], keep[r].nonzero()[:3, 0]])
                          for r in range(4)])
    pruned = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 3, 4], [1, 2, 5]])
    take = torch.tensor([True, True, False, True])
    batch = RowsRefit(h, w0, keep)
    fb = batch.free_blocks(blocks)
    errors = fb.exact_errors(pruned)
    batch.apply(fb, pruned, errors, take)
    for r in range(4):
        one = RowsRefit(h, w0[r:r + 1], keep[r:r + 1])
        fb_one = one.free_blocks(blocks[r:r + 1])
        torch.testing.assert_close(fb_one.m_bb[0], fb.m_bb[r], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fb_one.y[0], fb.y[r], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fb_one.exact_errors(pruned[r:r + 1]), errors[r:r + 1],
                                   rtol=1e-12, atol=0)
        if take[r]:
            one.apply(fb_one, pruned[r:r + 1], errors[r:r + 1], torch.tensor([True]))
        assert torch.equal(one.keep[0], batch.keep[r])
        torch.testing.assert_close(one.weight[0], batch.weight[r], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(one.error[0], batch.error[r], rtol=1e-12, atol=0)


def test_blocks_take_the_best_candidates_and_explore_the_pool_after_a_rejection():
    cols, block = 24, 8
    h = _hessian(cols, 60, seed=12)
    gen = torch.Generator().manual_seed(13)
    w0 = torch.randn(2, cols, generator=gen, dtype=torch.float64)
    keep = torch.rand(2, cols, generator=gen).argsort(1) < 12
    rows = RowsRefit(h, w0, keep)
    explore = torch.tensor([False, True])
    chosen = choose_blocks(rows, group_ids((1, cols), parse_pattern("per_output"))[0], block,
                           torch.Generator().manual_seed(0), explore=explore)
    for r in range(2):
        # the candidates' scores by brute force: a pruned weight's return, g_j^2 / H_jj with
        # g = H (w - w0) at the row's refit, and a kept weight's OBS cost from an explicit
        # inverse of H on the kept set
        kept = keep[r].nonzero()[:, 0]
        pruned = (~keep[r]).nonzero()[:, 0]
        _, w = _refit_error(h, w0[r], keep[r])
        gain = ((w - w0[r]) @ h)[pruned] ** 2 / torch.diagonal(h)[pruned]
        cost = w[kept] ** 2 / torch.diagonal(torch.linalg.inv(h[kept][:, kept]))
        ranked_pruned = pruned[gain.argsort(descending=True)].tolist()
        ranked_kept = kept[cost.argsort()].tolist()
        half = block // 2
        got_pruned = set(chosen[r, :half].tolist())
        got_kept = set(chosen[r, half:].tolist())
        if explore[r]:  # at random from the best twice as many
            assert got_pruned <= set(ranked_pruned[:2 * half])
            assert got_kept <= set(ranked_kept[:2 * half])
        else:
            assert got_pruned == set(ranked_pruned[:half])
            assert got_kept == set(ranked_kept[:half])


@pytest.mark.parametrize("pattern", ["per_output", "2:4"])
def test_every_accepted_step_lowers_the_true_post_refit_error(pattern):
    cols = 32
    h = _hessian(cols, 48, seed=5)
    w0 = torch.randn(3, cols, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    groups = group_ids((1, cols), parse_pattern(pattern))[0]
    keep = (torch.arange(cols) % 4 < 2).repeat(3, 1)  # 2 of every 4 kept
    rows = RowsRefit(h, w0, keep)
    solver = get_solver("anneal")
    gen = torch.Generator().manual_seed(0)
    error = torch.tensor([_refit_error(h, w0[r], keep[r])[0] for r in range(3)],
                         dtype=torch.float64)
    accepted = 0
    for _ in range(40):
        ok, change = refit_step([rows], [choose_blocks(rows, groups, 16, gen)], groups,
                                solver, gen)
        truth = torch.tensor([_refit_error(h, w0[r], rows.keep[r])[0] for r in range(3)],
                             dtype=torch.float64)
        torch.testing.assert_close(rows.error, truth, rtol=1e-8, atol=0)
        assert torch.all(change[ok] < 0)
        torch.testing.assert_close(truth[ok], (error + change)[ok], rtol=1e-8, atol=0)
        torch.testing.assert_close(truth[~ok], error[~ok], rtol=1e-12, atol=0)
        accepted += int(ok.sum())
        error = truth
        for r in range(3):
            counts = torch.bincount(groups[~rows.keep[r]], minlength=int(groups.max()) + 1)
            assert torch.all(counts == torch.bincount(groups[~keep[r]], minlength=len(counts)))
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
                           steps=8 * 20, block_size=16, objective="refit", mask_damp=0.01)
    assert mask_matches_pattern(result.mask, parse_pattern(pattern), 0.5)
    assert torch.all(result.weight[~result.mask] == 0) and result.accepted > 0
    assert result.error_after == pytest.approx(
        float(reconstruction_error(w0, result.weight, hessian).sum()), rel=1e-6)
    assert result.error_after < 0.95 * start
    assert result.convergence["rows_visited"] == 8


def test_improve_layer_refit_scores_masks_under_mask_damp_and_refits_with_damp():
    gen = torch.Generator().manual_seed(9)
    w0 = torch.randn(6, 16, generator=gen)
    x = torch.randn(48, 16, generator=gen)
    hessian = x.T @ x / 48
    mask = torch.rand(6, 16, generator=gen).argsort(1) < 8
    result = improve_layer(w0, hessian, mask, pattern="per_output", sparsity=0.5, steps=24,
                           block_size=8, objective="refit", mask_damp=0.3, damp=0.01)
    steps_only = improve_layer(w0, hessian, mask, pattern="per_output", sparsity=0.5,
                               steps=24, block_size=8, objective="refit", mask_damp=0.3,
                               damp=0.3)
    assert torch.equal(result.mask, steps_only.mask) and result.accepted > 0
    h = hessian.double() + 0.01 * torch.diagonal(hessian).mean() * torch.eye(
        16, dtype=torch.float64)
    for r in range(6):  # the weights are the damp=0.01 refit of the mask the steps chose
        truth = _refit_error(h, w0[r].double(), result.mask[r])[1]
        torch.testing.assert_close(result.weight[r].double(), truth, rtol=1e-3, atol=1e-4)


def test_improve_rows_refits_rows_the_budget_does_not_reach():
    gen = torch.Generator().manual_seed(8)
    w0 = torch.randn(6, 16, generator=gen)
    x = torch.randn(64, 16, generator=gen)
    hessian = (x.T @ x / 64).double()
    mask = torch.rand(6, 16, generator=gen).argsort(1) < 8
    result = improve_rows(w0, hessian, mask, start=w0 * mask, pattern=parse_pattern(
        "per_output"), block_size=8, solver=get_solver("greedy"), seed=0, damp=0.01,
        steps=2)  # two rows get one step each
    assert result.rows_visited == 2
    h = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(16, dtype=torch.float64)
    for r in range(6):
        truth = _refit_error(h, w0[r].double(), result.mask[r])[1]
        torch.testing.assert_close(result.weight[r].double(), truth, rtol=1e-3, atol=1e-4)


def test_refit_objective_refuses_no_ridge_and_non_finite_statistics():
    w0, hessian = torch.randn(4, 8), torch.eye(8)
    mask = torch.arange(8).repeat(4, 1) < 4
    with pytest.raises(ValueError, match="mask_damp > 0"):
        improve_layer(w0, hessian, mask, pattern="per_output", sparsity=0.5, steps=2,
                      objective="refit", mask_damp=0.0)
    hessian[2, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        improve_layer(w0, hessian, mask, pattern="per_output", sparsity=0.5, steps=2,
                      objective="refit", mask_damp=0.1)
    with pytest.raises(ValueError, match="unknown objective"):
        improve_layer(w0, torch.eye(8), mask, pattern="per_output", sparsity=0.5, steps=2,
                      objective="obs")
    with pytest.raises(ValueError, match="block_choice must be 'best_first' or 'random'"):
        improve_rows(w0, torch.eye(8), mask, start=w0 * mask, pattern=parse_pattern("2:4"),
                     block_size=4, solver=get_solver("greedy"), seed=0, damp=0.1, steps=2,
                     block_choice="best")


def test_unstructured_rows_trade_sparsity_and_keep_the_layer_count():
    gen = torch.Generator().manual_seed(9)
    w0 = torch.randn(4, 16, generator=gen) * torch.tensor([[4.0], [1.0], [0.3], [1.0]])
    x = torch.randn(64, 16, generator=gen)
    hessian = (x.T @ x / 64).double()
    mask = torch.arange(16).repeat(4, 1) % 2 == 0  # 8 of 16 in every row
    h = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(16, dtype=torch.float64)
    start = sum(_refit_error(h, w0[r].double(), mask[r])[0] for r in range(4))
    result = improve_rows(w0, hessian, mask, start=w0 * mask, pattern=parse_pattern(
        "unstructured"), block_size=16, solver=get_solver("anneal"), seed=0, damp=0.01,
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


def test_a_step_on_a_row_with_fewer_kept_weights_than_its_block_adds_is_exact():
    cols = 32
    h = _hessian(cols, 64, seed=12)
    w0 = torch.randn(2, cols, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    keep = torch.zeros(2, cols, dtype=torch.bool)
    keep[:, [3, 17, 29]] = True  # k = 3, while a 16-weight block adds 8 pruned ones
    rows = RowsRefit(h, w0, keep)
    groups = torch.zeros(cols, dtype=torch.long)
    solver = get_solver("anneal")
    gen = torch.Generator().manual_seed(1)
    accepted = 0
    for _ in range(10):
        ok, _ = refit_step([rows], [choose_blocks(rows, groups, 16, gen)], groups, solver, gen)
        accepted += int(ok.sum())
        truth = torch.tensor([_refit_error(h, w0[r], rows.keep[r])[0] for r in range(2)],
                             dtype=torch.float64)
        torch.testing.assert_close(rows.error, truth, rtol=1e-8, atol=0)
        assert torch.equal(rows.keep.sum(1), torch.tensor([3, 3]))
    assert accepted > 0


def test_the_settings_batch_size_reaches_the_refit_steps(monkeypatch):
    import icbs.layerwise
    from icbs.layer_pruning import SequentialSettings, improve_weight

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["batch_elements"])
        return improve_rows(*args, **kwargs)

    monkeypatch.setattr(icbs.layerwise, "improve_rows", recording)
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 16, generator=gen)
    x = torch.randn(64, 16, generator=gen)
    mask = mask_from_scores(w0.abs(), 0.5, "per_output")
    settings = SequentialSettings(method="icbs", objective="refit", sparsity=0.5,
                                  pattern="per_output", block_size=8, solver="greedy",
                                  refit_batch_elements=1234)
    weight, new_mask, _ = improve_weight(settings, w0, x.T @ x / 64, w0 * mask, mask, None, 12)
    assert seen == [1234]
    assert mask_matches_pattern(new_mask, parse_pattern("per_output"), 0.5)
