import itertools

import numpy as np
import pytest
import torch

from icbs.block_qubo import build_block_qubo, build_block_qubos, quadratic_model
from icbs.estimators import LayerwiseEstimator
from icbs.layers import PrunableLayer
from icbs.masks import group_ids, mask_from_scores, parse_pattern
from icbs.step import BlockAnswer, set_block_mask


def all_states(n):
    return [np.array(x, dtype=np.int8) for x in itertools.product([0, 1], repeat=n)]


@pytest.mark.parametrize("gamma,ridge", [(1.0, 0.0), (0.75, 0.3)])
def test_qubo_equals_quadratic_model_for_every_state(gamma, ridge):
    gen = torch.Generator().manual_seed(1)
    n = 7
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    pruned_now = torch.tensor([1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    a = torch.where(pruned_now, v, torch.zeros(n, dtype=torch.float64))  # pruned weights return
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    G = torch.randn(5, n, generator=gen, dtype=torch.float64)
    H = G.T @ G
    Q, c = quadratic_model(v, a, g, H, gamma, ridge)
    for x in all_states(n):
        D = a - torch.as_tensor(x, dtype=torch.float64) * v
        model = gamma * g @ D + 0.5 * D @ H @ D + ridge * D @ D
        assert x @ Q @ x + c == pytest.approx(float(model), abs=1e-10)


@pytest.mark.parametrize("pattern", ["per_output", "2:4"])
def test_stacked_qubos_are_the_blocks_built_one_at_a_time(pattern):
    gen = torch.Generator().manual_seed(3)
    rows, n = 5, 8
    v, a, g = (torch.randn(rows, n, generator=gen, dtype=torch.float64) for _ in range(3))
    G = torch.randn(rows, 6, n, generator=gen, dtype=torch.float64)
    H = G.transpose(1, 2) @ G
    H[0, 2, 5] = H[0, 5, 2] = 1e-15 * float(H[0].abs().max())  # dropped by eps in both
    # each row's block: two 2:4 groups (ids 3 and 7, or one id for per_output) in shuffled
    # order, two pruned weights in each group
    ids = torch.tensor([3, 3, 3, 3, 7, 7, 7, 7]) if pattern == "2:4" else torch.zeros(n).long()
    groups = torch.stack([ids[torch.randperm(n, generator=gen)] for _ in range(rows)])
    x = torch.zeros(rows, n, dtype=torch.bool)
    for r in range(rows):
        for group in groups[r].unique():
            x[r, (groups[r] == group).nonzero()[:2, 0]] = True
    stack = build_block_qubos(v, a, g, H, x, groups, gamma=0.5, ridge=0.2)
    for r in range(rows):
        one = build_block_qubo(v[r], a[r], g[r], H[r], x[r], groups[r], gamma=0.5, ridge=0.2)
        # equal up to the rounding of a batched against a single matrix-vector product
        np.testing.assert_allclose(stack.problem(r).Q, one.problem.Q, rtol=1e-12, atol=1e-15)
        if r == 0:  # the tiny coupling is zeroed in both
            assert stack.problem(r).Q[2, 5] == one.problem.Q[2, 5] == 0.0
        assert np.array_equal(stack.problem(r).groups, one.problem.groups)
        assert stack.problem(r).k.tolist() == one.problem.k.tolist() == \
            ([2, 2] if pattern == "2:4" else [2])
    Qb, cb = quadratic_model(v, a, g, H, 0.5, 0.2)
    for r in range(rows):
        Q, c = quadratic_model(v[r], a[r], g[r], H[r], 0.5, 0.2)
        np.testing.assert_allclose(Qb[r], Q, rtol=1e-12, atol=1e-15)
        assert cb[r] == pytest.approx(c, rel=1e-12)


def test_small_entries_are_dropped_by_magnitude_not_sign():
    v = torch.tensor([1.0, 1.0, 1.0])
    H = torch.tensor([[2.0, -1.0, 1e-14], [-1.0, 2.0, 0.0], [1e-14, 0.0, 2.0]])
    qubo = build_block_qubo(v, torch.zeros(3), torch.zeros(3), H,
                            torch.tensor([True, False, False]), torch.zeros(3, dtype=torch.long),
                            eps=1e-9)
    Qs = qubo.problem.Q
    assert Qs[0, 1] < 0  # a large negative coupling survives
    assert Qs[0, 2] == 0  # a tiny positive one is dropped
    assert qubo.problem.k.tolist() == [1]


@pytest.mark.parametrize("reconstructed", [False, True])
@pytest.mark.parametrize("pattern", ["unstructured", "per_output", "2:4"])
def test_layerwise_qubo_is_the_true_change_in_reconstruction_error(pattern, reconstructed):
    gen = torch.Generator().manual_seed(2)
    rows, cols = 3, 8
    w0 = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    X = torch.randn(20, cols, generator=gen, dtype=torch.float64)
    Hx = X.T @ X / len(X)
    mask = mask_from_scores(w0.abs(), 0.5, pattern)
    weight = w0 + 0.1 * torch.randn(rows, cols, generator=gen, dtype=torch.float64) \
        if reconstructed else w0.clone()
    layer = PrunableLayer("l", None, w0, mask, weight)
    est = LayerwiseEstimator({"l": Hx})
    groups = group_ids((rows, cols), parse_pattern(pattern)).flatten()
    idx = torch.tensor([0, 1, 2, 3, 9, 12, 13, 17, 20])  # spans rows and groups
    keep = mask.flatten()[idx]
    g, H = est.block(layer, idx)
    v = torch.where(keep, weight.flatten()[idx], w0.flatten()[idx])
    a = v - layer.pruned_weight().flatten()[idx]
    qubo = build_block_qubo(v, a, g, H, ~keep, groups[idx], eps=0.0)

    def true_error(w):
        d = w - w0
        return float(((d @ Hx) * d).sum())

    before = true_error(layer.pruned_weight())
    for x in all_states(len(idx)):
        new = layer.pruned_weight().flatten().clone()
        new[idx] = (1 - torch.as_tensor(x, dtype=torch.float64)) * v
        assert qubo.delta(x) == pytest.approx(true_error(new.reshape(rows, cols)) - before,
                                              abs=1e-9)
    # the scaled solver problem ranks states like the model and keeps each group's count
    feasible = [x for x in all_states(len(idx)) if qubo.problem.is_feasible(x)]
    energies = np.array([qubo.problem.energy(x) for x in feasible])
    deltas = np.array([qubo.delta(x) for x in feasible])
    assert np.argmin(energies) == np.argmin(deltas)
    best = feasible[int(np.argmin(deltas))]
    answer = BlockAnswer(idx, best, qubo.x_current, qubo.delta(best), 0.0, 0.0, {})
    set_block_mask(layer, answer)
    # the layer now holds what the model assumed: a weight that comes back is w0 again
    assert true_error(layer.pruned_weight()) - before == pytest.approx(answer.delta, abs=1e-9)
    for gid in groups.unique():
        in_group = groups == gid
        assert (~layer.mask.flatten()[in_group]).sum() == (~mask.flatten()[in_group]).sum()
