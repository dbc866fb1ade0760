"""`SwapAnnealSampler` as a dimod.Sampler: dimod's conformance kit plus cardinality checks."""

import unittest
from itertools import product

import dimod
import dimod.testing
import numpy as np
import pytest

from solvers import CardinalityQUBO, SwapAnnealSampler, get_solver


def test_sampler_api():
    dimod.testing.assert_sampler_api(SwapAnnealSampler())


@dimod.testing.load_sampler_bqm_tests(SwapAnnealSampler)
class TestConformance(unittest.TestCase):
    """dimod's generated tests: empty, 1-variable, K3 ... BQMs of every class, no k given."""


def test_unconstrained_sampling_finds_the_ground_state():
    rng = np.random.default_rng(0)
    for _ in range(10):
        n = int(rng.integers(1, 9))
        bqm = dimod.generators.gnp_random_bqm(n, 0.7, "SPIN", random_state=int(rng.integers(99)))
        exact = dimod.ExactSolver().sample(bqm).first.energy
        ss = SwapAnnealSampler().sample(bqm, num_reads=3, seed=1)
        assert len(ss) == 3 and ss.vartype is dimod.SPIN
        dimod.testing.assert_sampleset_energies(ss, bqm)
        assert ss.first.energy == pytest.approx(exact)


def test_cardinality_keyword_with_labels_and_groups():
    rng = np.random.default_rng(1)
    labels = ["a", "b", ("c", 1), "d", "e", "f"]
    Q = {}
    for i, u in enumerate(labels):
        for v in labels[i:]:
            Q[(u, v)] = float(rng.standard_normal())
    bqm = dimod.BinaryQuadraticModel.from_qubo(Q, offset=0.5)
    groups = {"a": 0, "b": 0, ("c", 1): 0, "d": 1, "e": 1, "f": 1}
    ss = SwapAnnealSampler().sample(bqm, k=[1, 2], groups=groups, num_reads=2, seed=3)
    dimod.testing.assert_sampleset_energies(ss, bqm)
    best = min(
        bqm.energy(dict(zip(labels, s, strict=True)))
        for s in product((0, 1), repeat=6)
        if sum(s[:3]) == 1 and sum(s[3:]) == 2
    )
    for sample in ss.samples():
        assert sum(sample[v] for v in labels[:3]) == 1
        assert sum(sample[v] for v in labels[3:]) == 2
    assert ss.first.energy == pytest.approx(best)


def test_spin_cardinality_and_warm_start_and_seed():
    bqm = dimod.generators.gnp_random_bqm(12, 1.0, "SPIN", random_state=5)
    ss = SwapAnnealSampler().sample(bqm, k=4, seed=2, initial_state={v: 1 if v < 4 else -1
                                                                      for v in bqm.variables})
    assert all(sum(s[v] == 1 for v in bqm.variables) == 4 for s in ss.samples())
    again = SwapAnnealSampler().sample(bqm, k=4, seed=2)
    assert ss.first.energy == again.first.energy
    with pytest.raises(ValueError, match="groups given without k"):
        SwapAnnealSampler().sample(bqm, groups=[0] * 12)


def test_sampler_and_solver_agree():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((10, 10))
    p = CardinalityQUBO((A + A.T) / 2, 5)
    bqm = p.to_bqm(penalty=0.0)
    ss = SwapAnnealSampler().sample(bqm, k=5, seed=0)
    assert ss.first.energy == pytest.approx(get_solver("exhaustive").solve(p).energy)
