"""Every solver against exhaustive enumeration; kernels against brute force; errors; seeds."""


import dimod
import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icbs.threads import set_threads
from solvers import CardinalityQUBO, QUBOStack, SolveResult, available, get_solver
from solvers import _kernels as K
from solvers.penalty import repair


@pytest.fixture(params=[1, 2])
def threads(request):
    """The stack kernels run their problems on numba's threads: one, then two."""
    before = torch.get_num_threads(), numba.get_num_threads()
    set_threads(request.param)
    yield request.param
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


def random_problem(rng, n, max_groups=3, pruning=False):
    if pruning:  # Q = 1/2 (w w^T) * H, H = G^T G / m
        w = rng.standard_normal(n)
        G = rng.standard_normal((max(2, n // 2), n))
        Q = 0.5 * np.outer(w, w) * (G.T @ G / G.shape[0])
    else:
        A = rng.standard_normal((n, n))
        Q = (A + A.T) / 2
    num_groups = int(rng.integers(1, min(max_groups, n) + 1))
    groups = np.concatenate([np.arange(num_groups), rng.integers(0, num_groups, n - num_groups)])
    rng.shuffle(groups)
    sizes = np.bincount(groups)
    k = np.array([rng.integers(0, s + 1) for s in sizes])
    return CardinalityQUBO(Q, k, groups, const=float(rng.standard_normal()))


def brute_minimum(p):
    """Independent truth: loop over all 2^n states."""
    best = np.inf
    for bits in range(2**p.n):
        x = np.array([(bits >> i) & 1 for i in range(p.n)], dtype=np.int8)
        if p.is_feasible(x):
            best = min(best, p.energy(x))
    return best


def no_improving_swap(p, x, tol=1e-9):
    e = p.energy(x)
    for g in range(p.num_groups):
        idx = np.flatnonzero(p.groups == g)
        for i in idx[x[idx] == 1]:
            for j in idx[x[idx] == 0]:
                y = x.copy()
                y[i], y[j] = 0, 1
                if p.energy(y) < e - tol * max(1.0, abs(e)):
                    return False
    return True


def test_available_lists_every_solver():
    assert available() == ["anneal", "dimod", "exhaustive", "greedy", "neal"]
    with pytest.raises(ValueError, match="unknown solver 'tabu'; available: anneal"):
        get_solver("tabu")


def test_exhaustive_matches_loop_over_all_states():
    rng = np.random.default_rng(0)
    for _ in range(25):
        p = random_problem(rng, int(rng.integers(1, 10)))
        r = get_solver("exhaustive").solve(p)
        assert isinstance(r, SolveResult) and r.x.dtype == np.int8
        assert r.energy == pytest.approx(brute_minimum(p), abs=1e-9)
        assert r.info["iterations"] == p.num_feasible()


def test_exhaustive_refuses_large_problems():
    p = CardinalityQUBO(np.eye(40), 20)
    with pytest.raises(ValueError, match="137846528820 feasible states"):
        get_solver("exhaustive").solve(p)


@pytest.mark.parametrize("name", ["greedy", "anneal", "neal"])
def test_solvers_feasible_with_correct_energy(name):
    rng = np.random.default_rng(1)
    params = {"neal": {"num_reads": 4, "num_sweeps": 200}}.get(name, {})
    solver = get_solver(name, **params)
    for t in range(30):
        p = random_problem(rng, int(rng.integers(1, 17)), pruning=t % 2 == 0)
        r = solver.solve(p, seed=t)
        assert p.is_feasible(r.x) and r.x.dtype == np.int8
        assert r.energy == p.energy(r.x)
        assert r.info["wall_time"] >= 0 and r.info["restarts"] >= 1
        if name != "neal":
            assert no_improving_swap(p, r.x)


def hard_small_problem(rng, n, pruning):
    """k = |g| // 2 in one or two groups: the most feasible states for n."""
    if pruning:
        w = rng.standard_normal(n)
        G = rng.standard_normal((max(2, n // 4), n))
        Q = 0.5 * np.outer(w, w) * (G.T @ G / G.shape[0])
    else:
        A = rng.standard_normal((n, n))
        Q = (A + A.T) / 2
    groups = np.arange(n) % int(rng.integers(1, 3))
    rng.shuffle(groups)
    return CardinalityQUBO(Q, np.bincount(groups) // 2, groups)


def test_anneal_finds_the_exact_optimum_on_small_problems():
    rng = np.random.default_rng(2)
    anneal, greedy, exact = get_solver("anneal"), get_solver("greedy"), get_solver("exhaustive")
    hits, greedy_hits, total = 0, 0, 80
    for t in range(total):
        p = hard_small_problem(rng, int(rng.integers(10, 17)), pruning=t % 2 == 0)
        e_opt = exact.solve(p).energy
        e = anneal.solve(p, seed=t).energy
        assert e >= e_opt - 1e-9
        tol = 1e-9 * max(1.0, abs(e_opt))
        hits += e <= e_opt + tol
        greedy_hits += greedy.solve(p).energy <= e_opt + tol
    assert hits >= 0.95 * total, f"anneal optimal on only {hits}/{total}"
    assert greedy_hits <= 0.7 * total  # the instances are not trivial for local search


def test_greedy_is_steepest_swap_descent():
    # hand-checked: from x0 = [1,1,0,0] the best swap is 0 <-> 3 and then no swap improves
    Q = np.diag([1.0, 3.0, 0.0, -1.0])
    p = CardinalityQUBO(Q, 2)
    r = get_solver("greedy").solve(p, x0=[1, 1, 0, 0])
    assert r.x.tolist() == [0, 0, 1, 1]
    assert r.energy == pytest.approx(-1.0) and r.info["iterations"] == 2
    one = get_solver("greedy", max_swaps=1).solve(p, x0=[1, 1, 0, 0])
    assert one.x.tolist() == [1, 0, 0, 1]  # the single best swap first (3 -> -1)


def test_warm_start_is_used_and_checked():
    rng = np.random.default_rng(3)
    p = random_problem(rng, 12, max_groups=1, pruning=True)
    x0 = get_solver("exhaustive").solve(p).x
    for name in ["greedy", "anneal"]:
        r = get_solver(name).solve(p, x0=x0, seed=0)
        assert r.energy <= p.energy(x0) + 1e-12
        bad = x0.copy()
        bad[np.flatnonzero(bad == 0)[0]] = 1
        with pytest.raises(ValueError, match="warm start x0 is infeasible"):
            get_solver(name).solve(p, x0=bad)
        with pytest.raises(ValueError, match="warm start x0 must have shape"):
            get_solver(name).solve(p, x0=x0[:-1])


@pytest.mark.parametrize("name, params", [("anneal", {"restarts": 3}), ("greedy", {}),
                                          ("neal", {"num_reads": 3, "num_sweeps": 50}),
                                          ("anneal", {"start": "random"})])
def test_same_seed_same_answer(name, params):
    p = random_problem(np.random.default_rng(4), 60, max_groups=3, pruning=True)
    a = get_solver(name, **params).solve(p, seed=7)
    b = get_solver(name, **params).solve(p, seed=7)
    assert np.array_equal(a.x, b.x) and a.energy == b.energy


@pytest.mark.parametrize("name", ["anneal", "greedy"])
def test_solve_many_answers_each_problem_as_solve_does(name):
    rng = np.random.default_rng(5)
    problems = [random_problem(rng, n, pruning=True) for n in (6, 9, 12)]
    starts = [None, problems[1].magnitude_start(), None]
    solver = get_solver(name)
    many = solver.solve_many(problems, starts, [1, 2, 3])
    for p, x0, seed, result in zip(problems, starts, [1, 2, 3], many, strict=True):
        one = solver.solve(p, x0=x0, seed=seed)
        assert np.array_equal(result.x, one.x) and result.energy == one.energy
    with pytest.raises(ValueError, match="one x0 and one seed per problem"):
        solver.solve_many(problems, starts[:2], [1, 2, 3])


@pytest.mark.parametrize("name,params", [("greedy", {}), ("anneal", {}),
                                         ("anneal", {"restarts": 3, "cold_quantile": 5.0})])
def test_a_stack_of_problems_is_solved_as_each_problem_alone(name, params, threads):
    rng = np.random.default_rng(6)
    for groups in (1, 4):
        gids = np.repeat(np.arange(groups), 24 // groups)
        qs, ks = [], []
        for _ in range(5):
            a = rng.standard_normal((24, 24))
            qs.append((a + a.T) / 2)
            ks.append([int(rng.integers(1, 12 // groups)) for _ in range(groups)])  # < half
        stack = QUBOStack(np.stack(qs), ks, np.tile(gids, (5, 1)))
        starts = np.stack([stack.problem(i).magnitude_start() for i in range(5)])
        solver = get_solver(name, **params)
        x, energies = solver.solve_stack(stack, starts, list(range(5)))
        for i in range(5):
            one = solver.solve(stack.problem(i), x0=starts[i], seed=i)
            assert np.array_equal(x[i], one.x)
            assert energies[i] == pytest.approx(one.energy, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="infeasible for problem 0"):
        solver.solve_stack(stack, 1 - starts)
    with pytest.raises(ValueError, match="k_g"):
        QUBOStack(np.stack(qs), np.full((5, groups), 7), np.tile(gids, (5, 1)))


def test_layout_orders_each_group_ones_first_in_index_order():
    rng = np.random.default_rng(8)
    for _ in range(20):
        n, groups = int(rng.integers(1, 40)), int(rng.integers(1, 5))
        gids = rng.integers(0, groups, n)
        gids = np.unique(gids, return_inverse=True)[1]
        x = rng.integers(0, 2, n).astype(np.int8)
        sizes = np.bincount(gids)
        k = np.bincount(gids, weights=x, minlength=len(sizes)).astype(np.int64)
        perm, gstart, movable = K.layout(x, gids, k, sizes)
        expected = [i for g in range(len(sizes)) for one in (1, 0) for i in range(n)
                    if gids[i] == g and x[i] == one]
        assert perm.tolist() == expected
        assert gstart.tolist() == [int(sizes[:g].sum()) for g in range(len(sizes))]
        assert movable.tolist() == [i for i in range(n) if 0 < k[gids[i]] < sizes[gids[i]]]


def test_more_restarts_never_worse():
    rng = np.random.default_rng(11)
    for t in range(5):
        p = random_problem(rng, 80, pruning=True)
        one = get_solver("anneal").solve(p, seed=t)
        four = get_solver("anneal", restarts=4).solve(p, seed=t)
        assert four.info["energies"][0] == one.energy and four.energy <= one.energy


def test_anneal_parameters_and_info():
    p = random_problem(np.random.default_rng(5), 40, pruning=True)
    r = get_solver("anneal", num_betas=20, sweeps_per_beta=3, restarts=2).solve(p, seed=0)
    assert r.info["sweeps"] == 60 and r.info["restarts"] == 2
    assert len(r.info["energies"]) == 2 and r.energy == pytest.approx(min(r.info["energies"]))
    r = get_solver("anneal", betas=[0.1, 1.0, 10.0], polish=False).solve(p, seed=0)
    assert r.info["betas"] == (0.1, 10.0) and r.info["polish_swaps"] == 0
    r = get_solver("anneal", beta_range=(0.5, 50.0)).solve(p, seed=0)
    assert r.info["betas"] == pytest.approx((0.5, 50.0))
    for bad in [dict(num_betas=0), dict(restarts=0), dict(betas=[]), dict(betas=[np.inf]),
                dict(beta_range=(5.0, 1.0)), dict(start="zeros")]:
        with pytest.raises(ValueError):
            get_solver("anneal", **bad)


def test_anneal_default_schedule_parameters():
    p = random_problem(np.random.default_rng(6), 40, pruning=True)
    r = get_solver("anneal").solve(p, seed=0)
    assert r.info["proposals"] == 100 * 1024  # min_proposals_per_beta floor at small n
    hot = get_solver("anneal", hot_accept=0.5).solve(p, seed=0)
    assert hot.info["betas"][0] < r.info["betas"][0]  # a hotter start: smaller beta
    assert hot.info["betas"][1] == pytest.approx(r.info["betas"][1])
    for bad in [dict(hot_accept=0.0), dict(hot_accept=1.0), dict(cold_accept=2.0),
                dict(cold_quantile=-1.0), dict(cold_quantile=101.0)]:
        with pytest.raises(ValueError):
            get_solver("anneal", **bad)


def test_set_threads_sets_torch_and_numba_capped_at_the_pool(threads):
    assert torch.get_num_threads() == threads
    assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
    set_threads(10**6)  # more than numba's pool: numba takes its whole pool
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


def test_anneal_trivial_groups():
    # groups with k = 0 or k = |g| have no move; n = 1 and n = 0 work
    p = CardinalityQUBO(np.ones((4, 4)), [0, 2], [0, 0, 1, 1])
    assert get_solver("anneal").solve(p, seed=0).x.tolist() == [0, 0, 1, 1]
    assert get_solver("anneal").solve(CardinalityQUBO([[2.0]], 1)).energy == 2.0
    assert get_solver("greedy").solve(CardinalityQUBO(np.zeros((0, 0)), 0)).x.size == 0


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 40), st.integers(1, 4), st.integers(0, 10**6))
def test_anneal_kernel_keeps_fields_and_best_state_exact(n, num_groups, seed):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, n, max_groups=num_groups)
    x = p.random_state(rng)
    f = K.fields(p.Q, x)
    perm, gstart, movable = K.layout(x, p.groups, p.k, p.sizes)
    e0 = p.energy(x)
    xb = np.empty_like(x)
    best, e, _ = K.anneal_swaps(p.Q, np.diag(p.Q).copy(), x, f, perm, gstart, p.k, p.sizes,
                                p.groups, movable, np.geomspace(0.1, 10, 5), 2 * n, seed, xb)
    assert p.is_feasible(x) and p.is_feasible(xb)
    np.testing.assert_allclose(f, p.Q @ x, atol=1e-9)
    assert p.energy(x) - e0 == pytest.approx(e, abs=1e-9)
    assert p.energy(xb) - e0 == pytest.approx(best, abs=1e-9)
    assert best <= min(e, 0.0) + 1e-12
    # perm lists each group's ones first
    for g in range(p.num_groups):
        block = perm[gstart[g]: gstart[g] + p.sizes[g]]
        assert set(p.groups[block]) <= {g}
        assert x[block[: p.k[g]]].all() and not x[block[p.k[g]:]].any()


@pytest.mark.parametrize("kernel", ["polish_swaps", "polish_sweep"])
def test_polish_ends_where_no_swap_improves(kernel):
    rng = np.random.default_rng(6)
    for t in range(6):
        p = random_problem(rng, 30, max_groups=3, pruning=t % 2 == 0)
        x = p.random_state(rng)
        f = K.fields(p.Q, x)
        perm, gstart, _ = K.layout(x, p.groups, p.k, p.sizes)
        e0 = p.energy(x)
        rm = K.row_max_offdiag(p.Q)
        args = (p.Q, x, f, perm, gstart, p.k, p.sizes, rm, 10**9)
        if kernel == "polish_sweep":
            args = (p.Q, np.diag(p.Q).copy()) + args[1:]
        total, swaps, _ = getattr(K, kernel)(*args)
        assert p.is_feasible(x) and no_improving_swap(p, x)
        assert p.energy(x) - e0 == pytest.approx(total, abs=1e-9)
        np.testing.assert_allclose(f, p.Q @ x, atol=1e-9)


def _greedy_repair(p, x):
    """Group by group, flip the variable whose flip gives the lowest energy (by evaluating
    every candidate) until the count is right."""
    x = x.copy()
    for g in range(p.num_groups):
        members = np.flatnonzero(p.groups == g)
        while x[members].sum() != p.k[g]:
            value = 0 if x[members].sum() > p.k[g] else 1
            candidates = members[x[members] != value]
            energies = []
            for i in candidates:
                y = x.copy()
                y[i] = value
                energies.append(p.energy(y))
            x[candidates[int(np.argmin(energies))]] = value
    return x


def test_repair_fixes_counts_greedily():
    rng = np.random.default_rng(7)
    for _ in range(30):
        p = random_problem(rng, int(rng.integers(1, 12)))
        x = rng.integers(0, 2, p.n).astype(np.int8)
        y, flips = repair(p, x)
        assert p.is_feasible(y)
        assert flips == int(sum(abs(x[p.groups == g].sum() - p.k[g])
                                for g in range(p.num_groups)))
        assert int(np.sum(y != x)) == flips
        assert np.array_equal(y, _greedy_repair(p, x))
    # greedy choice: too many ones -> drop the one whose removal lowers E most
    p = CardinalityQUBO(np.diag([1.0, 5.0, 2.0]), 1)
    assert repair(p, np.array([1, 1, 1]))[0].tolist() == [1, 0, 0]


class CountingSampler(dimod.Sampler):
    """Returns fixed samples, to check the repair bookkeeping of the `dimod` solver."""

    parameters = {"num_reads": []}
    properties: dict = {}

    def sample(self, bqm, num_reads=1):
        samples = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 0, 1]][:num_reads]
        return dimod.SampleSet.from_samples_bqm((samples, [0, 1, 2, 3]), bqm)


class SpinExact(dimod.Sampler):
    """Answers in SPIN variables, in a shuffled variable order."""

    parameters: dict = {}
    properties: dict = {}

    def sample(self, bqm):
        spin = bqm.change_vartype(dimod.SPIN, inplace=False)
        ss = dimod.ExactSolver().sample(spin)
        order = list(reversed(list(ss.variables)))
        cols = [ss.variables.index(v) for v in order]
        return dimod.SampleSet.from_samples_bqm((ss.record.sample[:, cols], order), spin)


def test_dimod_solver_repairs_and_counts():
    p = CardinalityQUBO(np.diag([1.0, 2.0, 3.0, 4.0]), 2)
    r = get_solver("dimod", sampler=CountingSampler(), num_reads=3).solve(p)
    assert r.info["num_infeasible"] == 2 and r.info["num_repaired"] == 2
    assert r.info["repair_flips"] == 2 and r.info["num_samples"] == 3
    assert r.info["penalty"] == pytest.approx(p.default_penalty())
    assert r.x.tolist() == [1, 1, 0, 0] and r.energy == 3.0


def test_dimod_solver_with_exact_sampler_finds_optimum_and_spin_samplers_work():
    rng = np.random.default_rng(8)
    for _ in range(10):
        p = random_problem(rng, int(rng.integers(2, 9)))
        e_opt = get_solver("exhaustive").solve(p).energy
        # ExactSolver returns every state, the feasible ones unrepaired: the best is the optimum
        r = get_solver("dimod", sampler=dimod.ExactSolver()).solve(p)
        assert p.is_feasible(r.x) and r.energy == p.energy(r.x)
        assert r.energy == pytest.approx(e_opt, abs=1e-9)
        r = get_solver("dimod", sampler=SpinExact()).solve(p, seed=1)
        assert r.energy == pytest.approx(e_opt, abs=1e-9)


def test_dimod_solver_errors():
    p = CardinalityQUBO(np.eye(200), 100)
    with pytest.raises(ValueError, match="accepts at most 150 variables, the problem has 200"):
        get_solver("dimod", sampler=dimod.ExactSolver(), max_variables=150).solve(p)
    with pytest.raises(ValueError, match="needs sampler"):
        get_solver("dimod")
    with pytest.raises(ValueError, match="needs sampler"):
        get_solver("dimod", sampler=object())
    with pytest.raises(ValueError, match="penalty"):
        get_solver("neal", penalty=-2.0)


def test_neal_counts_infeasible_samples_with_weak_penalty():
    p = random_problem(np.random.default_rng(9), 30, max_groups=1, pruning=True)
    r = get_solver("neal", num_reads=5, num_sweeps=100, penalty=1e-6).solve(p, seed=0)
    assert r.info["penalty"] == 1e-6 and r.info["num_infeasible"] == 5
    assert p.is_feasible(r.x)
    polished = get_solver("neal", num_reads=5, num_sweeps=100, polish=True).solve(p, seed=0)
    assert no_improving_swap(p, polished.x)


def test_swap_move_set_connects_feasible_states():
    """From one feasible state, in-group swaps (the annealer's only move) reach every
    feasible state: a breadth-first search over swaps finds all of them."""
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    p = CardinalityQUBO(np.eye(9), [1, 2, 1], groups)
    start = p.magnitude_start()
    seen, frontier = {start.tobytes()}, [start]
    while frontier:
        x = frontier.pop()
        for i in np.flatnonzero(x == 1):
            for j in np.flatnonzero((x == 0) & (groups == groups[i])):
                y = x.copy()
                y[i], y[j] = 0, 1
                if y.tobytes() not in seen:
                    seen.add(y.tobytes())
                    frontier.append(y)
    feasible = {np.array(bits, dtype=np.int8).tobytes()
                for bits in np.ndindex(*([2] * 9)) if p.is_feasible(np.array(bits))}
    assert seen == feasible and len(feasible) == p.num_feasible() == 3 * 6 * 2


def test_neal_warm_start_becomes_the_initial_state():
    p = random_problem(np.random.default_rng(10), 12, max_groups=1)
    x0 = p.random_state(np.random.default_rng(0))
    # frozen at a very low temperature, neal keeps the initial state: x0 was passed through
    frozen = get_solver("neal", num_reads=2, num_sweeps=5, beta_range=(1e6, 1e6), penalty=1e3)
    assert np.array_equal(frozen.solve(p, x0=x0, seed=0).x, x0)
