import numpy as np
import torch

from icbs.layers import PrunableLayer
from icbs.masks import mask_from_scores, parse_pattern
from icbs.selection import BlockSelector


def layer_with_mask(rows=8, cols=16, sparsity=0.5, pattern="per_output", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(rows, cols, generator=gen)
    mask = mask_from_scores(w0.abs(), sparsity, pattern)
    return PrunableLayer("l", None, w0, mask, w0)


def test_blocks_mix_pruned_and_kept_within_groups():
    layer = layer_with_mask()
    sel = BlockSelector([layer], {"l": layer.w0.abs()}, parse_pattern("per_output"), 8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        block = sel.choose_block(0, rng)
        assert len(block) == 8 and len(set(block.tolist())) == 8
        rows = block // 16
        pruned = ~layer.mask.flatten()[block]
        for r in np.unique(rows):  # every group in the block can swap
            assert pruned[rows == r].any() and (~pruned[rows == r]).any()


def test_fixed_fractions_keep_the_extremes_out_of_play():
    layer = layer_with_mask(rows=1, cols=40, pattern="unstructured")
    scores = layer.w0.abs()
    sel = BlockSelector([layer], {"l": scores}, parse_pattern("unstructured"), 10,
                        fix_frac_prune=0.5, fix_frac_keep=0.5)
    flat, mask = scores.flatten(), layer.mask.flatten()
    pruned_sorted = torch.argsort(flat.masked_fill(mask, float("inf")))[:20]   # ascending
    kept_sorted = torch.argsort(flat.masked_fill(~mask, float("-inf")), descending=True)[:20]
    excluded = set(pruned_sorted[:10].tolist()) | set(kept_sorted[:10].tolist())
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(50):
        seen |= set(sel.choose_block(0, rng).tolist())
    assert not seen & excluded
    assert len(seen) == 20  # everything else is reachable


def test_tabu_keeps_changed_weights_out_for_a_while():
    layer = layer_with_mask(rows=1, cols=12, pattern="unstructured")
    sel = BlockSelector([layer], {"l": layer.w0.abs()}, parse_pattern("unstructured"), 12,
                        tabu_steps=3)
    rng = np.random.default_rng(2)
    sel.choose_block(0, rng)
    sel.mark_changed(0, np.array([0, 1]))
    for _ in range(3):
        assert not {0, 1} & set(sel.choose_block(0, rng).tolist())
    assert {0, 1} <= set(sel.choose_block(0, rng).tolist())


def test_score_selection_favours_marginal_weights():
    layer = layer_with_mask(rows=1, cols=400, pattern="unstructured")
    scores = layer.w0.abs().flatten()
    counts = {"score": np.zeros(400), "random": np.zeros(400)}
    for how in counts:
        sel = BlockSelector([layer], {"l": layer.w0.abs()}, parse_pattern("unstructured"), 20,
                            selection=how)
        rng = np.random.default_rng(3)
        for _ in range(300):
            counts[how][sel.choose_block(0, rng)] += 1
    pruned = ~layer.mask.flatten().numpy()
    top_pruned = np.argsort(np.where(pruned, scores.numpy(), -np.inf))[-50:]
    assert counts["score"][top_pruned].sum() > 1.5 * counts["random"][top_pruned].sum()


def test_layer_choice_round_robin_and_log_size():
    small, big = layer_with_mask(2, 4), layer_with_mask(64, 64)
    small.name, big.name = "a", "b"
    scores = {"a": small.w0.abs(), "b": big.w0.abs()}
    pattern = parse_pattern("per_output")
    robin = BlockSelector([small, big], scores, pattern, 4, layer_choice="round_robin")
    rng = np.random.default_rng(0)
    picks = []
    for _ in range(4):
        picks.append(robin.choose_layer(rng))
        robin.choose_block(picks[-1], rng)
    assert picks == [0, 1, 0, 1]
    by_size = BlockSelector([small, big], scores, pattern, 4)
    draws = np.bincount([by_size.choose_layer(rng) for _ in range(4000)], minlength=2)
    expected = np.log(8) / (np.log(8) + np.log(4096))  # 0.2
    assert abs(draws[0] / 4000 - expected) < 0.03


def test_rows_visited_by_priority_then_cyclically():
    layer = layer_with_mask(rows=4, cols=8, pattern="per_output")
    sel = BlockSelector([layer], {"l": layer.w0.abs()}, parse_pattern("per_output"), 8)
    sel.prioritize_rows(0, np.array([0.5, 3.0, 1.0, 2.0]))
    rng = np.random.default_rng(0)
    rows = [int(np.unique(sel.choose_block(0, rng) // 8)[0]) for _ in range(6)]
    assert rows == [1, 3, 2, 0, 1, 3]
