import numpy as np
import pytest
import torch

from icbs.masks import (
    Pattern,
    group_ids,
    mask_from_scores,
    mask_matches_pattern,
    parse_pattern,
    pruned_per_group,
)


@pytest.mark.parametrize("pattern", ["unstructured", "per_output", "2:4", "4:8"])
def test_masks_hit_the_count_exactly_even_with_ties(pattern):
    torch.manual_seed(0)
    # quantized scores: many exact ties, as in dequantized GGUF weights
    scores = torch.randint(0, 4, (12, 16)).float()
    mask = mask_from_scores(scores, 0.5, pattern)
    p = parse_pattern(pattern)
    groups = group_ids((12, 16), p).flatten()
    pruned = torch.bincount(groups, weights=(~mask).flatten().double())
    assert (pruned == pruned_per_group((12, 16), p, 0.5)).all()
    assert mask_matches_pattern(mask, p, 0.5)
    # within every group, no pruned weight scores higher than a kept one
    for g in groups.unique():
        s = scores.flatten()[groups == g]
        m = mask.flatten()[groups == g]
        assert s[~m].max() <= s[m].min()


@pytest.mark.parametrize("pattern", ["unstructured", "per_output", "2:4", "4:8"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_mask_equals_a_stable_sort_of_every_group(pattern, sparsity):
    """The pruned weights are the first k of each group in a stable ascending sort (ties go to
    the earlier weight), NaN scores counting as the highest."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (10, 16), generator=gen).float()
    scores[torch.rand(10, 16, generator=gen) < 0.05] = float("nan")
    p = parse_pattern(pattern)
    mask = mask_from_scores(scores, sparsity, p)
    k = pruned_per_group((10, 16), p, sparsity)
    groups = group_ids((10, 16), p).flatten().numpy()
    flat = scores.flatten().numpy()
    flat = np.where(np.isnan(flat), np.inf, flat)
    expect = np.ones(flat.size, dtype=bool)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)  # in position order
        expect[members[np.argsort(flat[members], kind="stable")[:k]]] = False
    assert np.array_equal(mask.flatten().numpy(), expect)


def test_groups_by_brute_force():
    rows, cols = 3, 8
    for pattern, expect in [
        ("unstructured", lambda r, c: 0),
        ("per_output", lambda r, c: r),
        ("2:4", lambda r, c: r * 2 + c // 4),
    ]:
        ids = group_ids((rows, cols), parse_pattern(pattern))
        for r in range(rows):
            for c in range(cols):
                assert ids[r, c] == expect(r, c)


def test_ties_broken_by_position():
    mask = mask_from_scores(torch.ones(1, 8), 0.25, "per_output")
    assert mask.tolist() == [[False, False, True, True, True, True, True, True]]


def test_bad_patterns_and_shapes():
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        parse_pattern("3:2")
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        parse_pattern("rows")
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        mask_from_scores(torch.ones(2, 6), 0.5, "2:4")
    assert parse_pattern("2:4") == Pattern("nm", 2, 4)
    assert str(parse_pattern("4:8")) == "4:8"


def test_settings_of_the_experiments_parse_to_pattern_and_sparsity():
    from icbs.masks import parse_setting

    assert parse_setting("unstructured@0.7") == ("unstructured", 0.7)
    assert parse_setting("2:4") == ("2:4", 0.5)
    assert parse_setting("4:8") == ("4:8", 0.5)
    with pytest.raises(ValueError, match="needs a sparsity"):
        parse_setting("per_output")
