"""CardinalityQUBO: validation, energies, penalty models, file round trips (brute-force truth)."""

from itertools import product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers import CardinalityQUBO


def random_problem(rng, n, num_groups=None, const=None):
    A = rng.standard_normal((n, n))
    Q = (A + A.T) / 2
    G = int(rng.integers(1, min(3, n) + 1)) if num_groups is None else num_groups
    groups = np.concatenate([np.arange(G), rng.integers(0, G, size=n - G)])
    rng.shuffle(groups)
    sizes = np.bincount(groups, minlength=G)
    k = np.array([rng.integers(0, s + 1) for s in sizes])
    c = float(rng.standard_normal()) if const is None else const
    return CardinalityQUBO(Q, k, groups, c)


def all_states(n):
    return np.array(list(product((0, 1), repeat=n)), dtype=np.int8)


def brute_energy(Q, x, c):
    return sum(Q[i, j] * x[i] * x[j] for i in range(len(x)) for j in range(len(x))) + c


def test_energy_and_feasibility_against_loops():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = random_problem(rng, int(rng.integers(1, 8)))
        X = all_states(p.n)
        E = p.energies(X)
        for x, e in zip(X, E, strict=True):
            assert p.energy(x) == pytest.approx(brute_energy(p.Q, x, p.const), abs=1e-9)
            assert e == pytest.approx(p.energy(x), abs=1e-9)
            counts = [int(x[p.groups == g].sum()) for g in range(p.num_groups)]
            assert p.is_feasible(x) == (counts == p.k.tolist())
        assert sum(p.is_feasible(x) for x in X) == p.num_feasible()


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9), st.integers(0, 10**6))
def test_swap_delta_formula_against_brute_force(n, seed):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, n, num_groups=1)
    x = rng.integers(0, 2, size=n).astype(np.int8)
    if x.all() or not x.any():
        x[0] ^= 1
    i = int(rng.choice(np.flatnonzero(x == 1)))
    j = int(rng.choice(np.flatnonzero(x == 0)))
    y = x.copy()
    y[i], y[j] = 0, 1
    assert p.swap_delta(x, i, j) == pytest.approx(p.energy(y) - p.energy(x), abs=1e-9)


def test_nonsymmetric_Q_is_symmetrized_with_same_energies():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((6, 6))
    p = CardinalityQUBO(A, 3)
    assert np.array_equal(p.Q, p.Q.T)
    for x in all_states(6):
        assert p.energy(x) == pytest.approx(float(x @ A @ x), abs=1e-12)
    assert not np.array_equal(A, A.T)  # the caller's array is untouched


def test_copy_false_shares_a_symmetric_matrix():
    Q = np.eye(4)
    assert CardinalityQUBO(Q, 2, copy=False).Q is Q
    assert CardinalityQUBO(Q, 2).Q is not Q


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((2, 3)), 1), "square"),
        ((np.zeros(4), 1), "square"),
        ((np.array([[0.0, np.nan], [np.nan, 0]]), 1), "finite"),
        ((np.array([[np.inf]]), 0), "finite"),
        (([["a", "b"], ["c", "d"]], 1), "numeric"),
        ((np.eye(3), 4), "outside 0..3"),
        ((np.eye(3), -1), "outside"),
        ((np.eye(3), [1, 1]), "one int per group"),
        ((np.eye(3), 1.5), "integers"),
        ((np.eye(3), 1, [0, 1]), "length n=3"),
        ((np.eye(3), 1, [0, 2, 2]), "empty"),
        ((np.eye(3), 1, [0, -1, 0]), "0..G-1"),
        ((np.eye(3), 1, [0, 0.5, 1]), "integers"),
        ((np.eye(3), [1, 3], [0, 1, 1]), r"k\[1\] = 3"),
    ],
)
def test_bad_input_names_the_problem(args, match):
    with pytest.raises(ValueError, match=match):
        CardinalityQUBO(*args)


def test_bad_const():
    with pytest.raises(ValueError, match="const"):
        CardinalityQUBO(np.eye(2), 1, const=np.nan)


def test_check_state_errors():
    p = CardinalityQUBO(np.eye(4), [1, 1], [0, 0, 1, 1])
    assert p.check_state([1, 0, 0, 1]).dtype == np.int8
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        p.check_state([1, 0, 1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        p.check_state([2, 0, 0, 1])
    with pytest.raises(ValueError, match="warm start x0 is infeasible: group 0 has 2 ones"):
        p.check_state([1, 1, 0, 1], what="warm start x0")


def test_magnitude_start_takes_smallest_diagonal_per_group():
    Q = np.diag([5.0, 1.0, 3.0, 2.0, 0.5, 4.0])
    p = CardinalityQUBO(Q, [1, 2], [0, 0, 0, 1, 1, 1])
    assert p.magnitude_start().tolist() == [0, 1, 0, 1, 1, 0]


def test_penalty_models_agree_with_energy_on_feasible_states():
    rng = np.random.default_rng(2)
    for _ in range(15):
        p = random_problem(rng, int(rng.integers(1, 8)))
        bqm = p.to_bqm()
        h, J, off = p.to_ising()
        P = p.default_penalty()
        for x in all_states(p.n):
            s = 2 * x.astype(float) - 1
            e_bqm = bqm.energy({i: int(x[i]) for i in range(p.n)})
            e_ising = float(h @ s + s @ J @ s + off)
            viol = sum((x[p.groups == g].sum() - p.k[g]) ** 2 for g in range(p.num_groups))
            expected = p.energy(x) + P * viol  # the penalty model everywhere
            assert e_bqm == pytest.approx(expected, rel=1e-9, abs=1e-9)
            assert e_ising == pytest.approx(expected, rel=1e-9, abs=1e-9)
            if viol == 0:
                assert e_bqm == pytest.approx(p.energy(x), rel=1e-9, abs=1e-9)
        assert np.all(np.tril(J) == 0)


def test_default_penalty_beats_every_single_flip():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = random_problem(rng, int(rng.integers(2, 8)))
        bqm = p.to_bqm()
        for x in all_states(p.n):
            if not p.is_feasible(x):
                continue
            e = bqm.energy(dict(enumerate(x.tolist())))
            for i in range(p.n):
                y = x.copy()
                y[i] ^= 1
                assert bqm.energy(dict(enumerate(y.tolist()))) >= e - 1e-9


def test_weak_penalty_can_lose_to_a_flip():
    # With P = 0 the unconstrained minimum (all ones here) is infeasible: the bound matters.
    p = CardinalityQUBO(-np.ones((3, 3)), 1)
    bqm = p.to_bqm(penalty=0.0)
    assert bqm.energy({0: 1, 1: 1, 2: 1}) < bqm.energy({0: 1, 1: 0, 2: 0})
    with pytest.raises(ValueError, match="penalty"):
        p.to_bqm(penalty=-1.0)


def test_npz_and_ubqp_round_trips_are_exact(tmp_path):
    rng = np.random.default_rng(4)
    for t in range(5):
        p = random_problem(rng, int(rng.integers(1, 30)))
        p.Q[0, 0] = 0.1 + 1e-17 * t  # awkward decimals
        p.Q[np.abs(p.Q) < 0.3] = 0.0  # some zeros (skipped in the text file)
        p.save(tmp_path / "p.npz")
        q = CardinalityQUBO.load(tmp_path / "p.npz")
        assert np.array_equal(q.Q, p.Q) and np.array_equal(q.k, p.k)
        assert np.array_equal(q.groups, p.groups) and q.const == p.const
        p.write_ubqp(tmp_path / "p.txt")
        r = CardinalityQUBO.read_ubqp(tmp_path / "p.txt", k=p.k, groups=p.groups, const=p.const)
        assert np.array_equal(r.Q, p.Q)
        header = (tmp_path / "p.txt").read_text().splitlines()[0]
        assert header == f"{p.n} {np.count_nonzero(np.triu(p.Q))}"


def test_ubqp_format_is_upper_triangle_coefficients(tmp_path):
    Q = np.array([[1.0, 0.5, 0.0], [0.5, 0.0, -2.0], [0.0, -2.0, 3.0]])
    CardinalityQUBO(Q, 1).write_ubqp(tmp_path / "q.txt")
    lines = (tmp_path / "q.txt").read_text().split("\n")
    assert lines[:5] == ["3 4", "1 1 1.0", "1 2 1.0", "2 3 -4.0", "3 3 3.0"]
    # a hand-written file, entries lower-triangle or repeated, reads as the same objective
    (tmp_path / "h.txt").write_text("3 5\n1 1 1\n2 1 0.5\n1 2 0.5\n3 2 -4\n3 3 3\n")
    assert np.array_equal(CardinalityQUBO.read_ubqp(tmp_path / "h.txt", k=1).Q, Q)


@pytest.mark.parametrize(
    "text, match",
    [("3\n", "first line"), ("a b\n", "two integers"), ("2 2\n1 1 1\n", "expected 2 lines"),
     ("2 1\n1 3 1\n", "1..2")],
)
def test_ubqp_bad_files(tmp_path, text, match):
    (tmp_path / "bad.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        CardinalityQUBO.read_ubqp(tmp_path / "bad.txt", k=1)


def test_load_rejects_other_npz(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="missing"):
        CardinalityQUBO.load(tmp_path / "x.npz")


def test_large_nonsymmetric_Q_is_symmetrized_in_chunks():
    A = np.random.default_rng(5).standard_normal((1100, 1100))  # more than two row chunks
    p = CardinalityQUBO(A, 550)
    assert np.array_equal(p.Q, 0.5 * (A + A.T)) and np.array_equal(p.Q, p.Q.T)
