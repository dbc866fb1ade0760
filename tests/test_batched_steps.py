"""Layerwise block steps on many rows at once, against the one-block QUBO and brute force."""

import itertools

import numpy as np
import pytest
import torch

from icbs.baselines import magnitude_mask
from icbs.batched_steps import _blocks, batched_step, block_qubos, improve_rows_batched
from icbs.block_qubo import build_block_qubo
from icbs.layerwise import improve_layer
from icbs.masks import group_ids, mask_matches_pattern, parse_pattern
from solvers import get_solver


def _layer(rows=6, cols=16, tokens=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen, dtype=torch.float64)
    h = x.T @ x / tokens
    w0 = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return w0, h


def _error(w0, weight, keep, h):
    d = weight * keep - w0
    return 0.5 * ((d @ h) * d).sum(1)


def test_batched_qubos_are_the_one_block_qubos():
    gen = torch.Generator().manual_seed(1)
    v, a, g = (torch.randn(3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    m = torch.randn(20, 20, generator=gen, dtype=torch.float64)
    h = m @ m.T
    blocks = torch.stack([torch.randperm(20, generator=gen)[:8] for _ in range(3)])
    q, c, scale = block_qubos(h.numpy(), blocks.numpy(), v.numpy(), a.numpy(), g.numpy())
    for r in range(3):
        hb = h[blocks[r]][:, blocks[r]]
        one = build_block_qubo(v[r], a[r], g[r], hb, torch.zeros(8, dtype=torch.bool),
                               torch.zeros(8, dtype=torch.long))
        np.testing.assert_allclose(q[r] * scale[r], one.Q, rtol=1e-12, atol=1e-12)
        assert np.abs(q[r]).max() == pytest.approx(1.0)
        assert float(c[r]) == pytest.approx(one.c, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("pattern", ["per_output", "2:4"])
def test_a_batched_step_takes_each_rows_exact_best_and_its_true_error_change(pattern):
    pattern = parse_pattern(pattern)
    w0, h = _layer()
    keep = magnitude_mask(w0.float(), 0.5, pattern)
    weight = w0 * keep * 0.9  # kept values away from w0, so the gradient matters
    groups = group_ids((1, w0.shape[1]), pattern)[0]
    blocks = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(r))[:8]
                          .sort().values for r in range(len(w0))])
    if pattern.kind == "nm":
        blocks = torch.tensor([[0, 1, 2, 3, 8, 9, 10, 11]] * len(w0))
    before = _error(w0, weight, keep, h)
    w, k = weight.clone(), keep.clone()
    delta = batched_step(w0, w, k, h, blocks, groups, get_solver("exhaustive"),
                         [0] * len(w0))
    after = _error(w0, w, k, h)
    torch.testing.assert_close(after - before, delta, rtol=1e-9, atol=1e-12)
    assert mask_matches_pattern(k, pattern, 0.5)
    for r in range(len(w0)):  # brute force over every feasible mask of the row's block
        best = 0.0
        cols = blocks[r].tolist()
        ids = groups[blocks[r]].tolist()
        now = [int(not keep[r, c]) for c in cols]
        for pruned in itertools.product([0, 1], repeat=8):
            if any(sum(p for p, gg in zip(pruned, ids, strict=True) if gg == g) !=
                   sum(p for p, gg in zip(now, ids, strict=True) if gg == g) for g in set(ids)):
                continue
            trial_keep, trial_w = keep[r].clone(), weight[r].clone()
            for c, p in zip(cols, pruned, strict=True):
                if not p and not keep[r, c]:
                    trial_w[c] = w0[r, c]
                trial_keep[c] = not p
            change = float(_error(w0[r:r + 1], trial_w[None], trial_keep[None], h)[0]
                           - before[r])
            best = min(best, change)
        assert float(delta[r]) == pytest.approx(best, rel=1e-9, abs=1e-12)


def _single_flip_changes(w0, weight, keep, h):
    """Brute force: each weight's error change when it alone flips (a return takes w0)."""
    before = _error(w0, weight, keep, h)
    changes = torch.empty_like(w0)
    for c in range(w0.shape[1]):
        k, w = keep.clone(), weight.clone()
        k[:, c] = ~k[:, c]
        w[:, c] = torch.where(keep[:, c], weight[:, c], w0[:, c])
        changes[:, c] = _error(w0, w, k, h) - before
    return changes


@pytest.mark.parametrize("pattern", ["per_output", "2:4"])
def test_best_first_blocks_hold_the_best_single_flips(pattern):
    pattern = parse_pattern(pattern)
    w0, h = _layer(rows=5, cols=16)
    keep = magnitude_mask(w0.float(), 0.5, pattern)
    weight = w0 * keep * 0.8
    groups = group_ids((1, 16), pattern)[0]
    changes = _single_flip_changes(w0, weight, keep, h)
    blocks = _blocks(w0, weight, keep, h, (weight * keep - w0) @ h, groups, 8,
                     torch.Generator().manual_seed(0), torch.zeros(5, dtype=torch.bool))
    for r in range(5):
        if pattern.kind == "nm":  # two whole groups: the lowest best return + best prune
            pruned, kept = ~keep[r].view(4, 4), keep[r].view(4, 4)
            row = changes[r].view(4, 4)
            rank = torch.where(pruned, row, torch.inf).amin(1) + \
                torch.where(kept, row, torch.inf).amin(1)
            want = (rank.argsort()[:2, None] * 4 + torch.arange(4)).flatten()
        else:  # the 4 cheapest returns and the 4 cheapest prunings
            back = torch.where(keep[r], torch.inf, changes[r]).argsort()[:4]
            prune = torch.where(keep[r], changes[r], torch.inf).argsort()[:4]
            want = torch.cat([back, prune])
        assert blocks[r].tolist() == want.sort().values.tolist()


def test_after_a_rejection_a_row_draws_from_the_best_twice_as_many():
    pattern = parse_pattern("per_output")
    w0, h = _layer(rows=6, cols=32)
    keep = magnitude_mask(w0.float(), 0.5, pattern)
    weight = w0 * keep * 0.8
    groups = group_ids((1, 32), pattern)[0]
    changes = _single_flip_changes(w0, weight, keep, h)
    explore = torch.tensor([True, False] * 3)
    drawn_apart = False
    for seed in range(5):
        blocks = _blocks(w0, weight, keep, h, (weight * keep - w0) @ h, groups, 8,
                         torch.Generator().manual_seed(seed), explore)
        for r in range(6):
            back = torch.where(keep[r], torch.inf, changes[r]).argsort()
            prune = torch.where(keep[r], changes[r], torch.inf).argsort()
            best = torch.cat([back[:4], prune[:4]]).sort().values.tolist()
            if not explore[r]:
                assert blocks[r].tolist() == best
                continue
            pool = set(back[:8].tolist()) | set(prune[:8].tolist())
            assert set(blocks[r].tolist()) <= pool and len(set(blocks[r].tolist())) == 8
            assert int((~keep[r, blocks[r]]).sum()) == 4
            drawn_apart |= blocks[r].tolist() != best
    assert drawn_apart


@pytest.mark.parametrize("block_choice", ["best_first", "random"])
@pytest.mark.parametrize("pattern", ["per_output", "4:8"])
def test_batched_rows_lower_the_error_keep_the_pattern_and_count_their_steps(pattern,
                                                                             block_choice):
    pattern = parse_pattern(pattern)
    w0, h = _layer(rows=40, cols=32, tokens=64)
    keep = magnitude_mask(w0.float(), 0.5, pattern)
    result = improve_rows_batched(w0, h, keep, weight=w0 * keep, pattern=pattern,
                                  block_size=16, solver=get_solver("greedy"), seed=0, steps=100,
                                  block_choice=block_choice)
    assert result.steps == 100 and result.passes == 100 / 40
    assert mask_matches_pattern(result.mask, pattern, 0.5)
    assert _error(w0, result.weight.double(), result.mask, h).sum() < \
        _error(w0, w0 * keep, keep, h).sum()
    again = improve_rows_batched(w0, h, keep, weight=w0 * keep, pattern=pattern,
                                 block_size=16, solver=get_solver("greedy"), seed=0, steps=100,
                                 block_choice=block_choice)
    assert torch.equal(again.mask, result.mask) and torch.equal(again.weight, result.weight)


def test_improve_layer_batched_matches_the_one_block_path_in_quality():
    w0, h = _layer(rows=24, cols=64, tokens=200, seed=3)
    w0, h = w0.float(), h.float()
    keep = magnitude_mask(w0, 0.5, parse_pattern("per_output"))
    common = dict(pattern="per_output", sparsity=0.5, steps=24 * 12, block_size=16,
                  solver="greedy")
    batched = improve_layer(w0, h, keep, batched=True, **common)
    single = improve_layer(w0, h, keep, **common)
    assert batched.steps == single.steps == 24 * 12
    assert batched.error_after < batched.error_before
    assert batched.error_after <= single.error_after * 1.05
    with pytest.raises(ValueError, match="per-row count"):
        improve_layer(w0, h, magnitude_mask(w0, 0.5, parse_pattern("unstructured")),
                      batched=True, **{**common, "pattern": "unstructured"})
