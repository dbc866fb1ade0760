"""`SwapAnnealSampler`: the `anneal` solver as a `dimod.Sampler` for Ocean code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dimod
import numpy as np

from solvers.anneal import SwapAnnealer
from solvers.problem import CardinalityQUBO


def bqm_to_dense(bqm: dimod.BinaryQuadraticModel, variables: list) -> tuple[np.ndarray, float]:
    """Dense symmetric Q and constant with E(x) = x^T Q x + c for the BINARY form of bqm."""
    if bqm.vartype is dimod.SPIN:
        bqm = bqm.change_vartype(dimod.BINARY, inplace=False)
    linear, (row, col, quad), offset = bqm.to_numpy_vectors(variable_order=variables)
    n = len(variables)
    Q = np.zeros((n, n))
    Q[np.arange(n), np.arange(n)] = linear
    np.add.at(Q, (row, col), quad / 2.0)
    np.add.at(Q, (col, row), quad / 2.0)
    return Q, float(offset)


class SwapAnnealSampler(dimod.Sampler):
    """Swap simulated annealing under cardinality constraints, speaking dimod.

    ``sample(bqm, k=..., groups=..., num_reads=..., seed=...)``: every sample has exactly
    k_g variables at 1 (BINARY) / +1 (SPIN) in each group. ``groups`` maps each variable to
    a group label 0..G-1 (a dict, or a sequence in ``bqm.variables`` order); k is an int or
    one int per group. Without k the problem is unconstrained: each variable gets a free
    slack partner, so a swap with it is a single flip. Other keywords (num_betas,
    sweeps_per_beta, beta_range, polish) go to the `anneal` solver; ``initial_state`` (a
    feasible dict or sequence) is a warm start.
    """

    parameters = {
        "k": [], "groups": [], "num_reads": [], "seed": [], "initial_state": [],
        "num_betas": [], "sweeps_per_beta": [], "beta_range": [], "polish": [],
    }
    properties: dict[str, Any] = {}

    def sample(self, bqm: dimod.BinaryQuadraticModel, k: Any = None, groups: Any = None,
               num_reads: int = 1, seed: int | None = None, initial_state: Any = None,
               **anneal_params: Any) -> dimod.SampleSet:
        variables = list(bqm.variables)
        n = len(variables)
        Q, offset = bqm_to_dense(bqm, variables)
        if groups is not None and isinstance(groups, Mapping):
            groups = [groups[v] for v in variables]
        x0 = None
        if initial_state is not None:
            if isinstance(initial_state, Mapping):
                initial_state = [initial_state[v] for v in variables]
            x0 = np.asarray(initial_state)
            if bqm.vartype is dimod.SPIN:
                x0 = (x0 + 1) // 2
        if k is None:
            if groups is not None:
                raise ValueError("groups given without k")
            # unconstrained: n slack variables with zero cost, one group of 2n, k = n
            Qp = np.zeros((2 * n, 2 * n))
            Qp[:n, :n] = Q
            problem = CardinalityQUBO(Qp, n, const=offset, copy=False)
            if x0 is not None:
                x0 = np.concatenate([x0, 1 - x0])
        else:
            problem = CardinalityQUBO(Q, k, groups, const=offset, copy=False)
        solver = SwapAnnealer(**anneal_params)
        rng = np.random.default_rng(seed)
        samples = np.zeros((num_reads, n), dtype=np.int8)
        infos = []
        for r in range(num_reads):
            res = solver.solve(problem, x0=x0, seed=int(rng.integers(0, 2**31 - 1)))
            samples[r] = res.x[:n]
            infos.append(res.info)
        if bqm.vartype is dimod.SPIN:
            samples = 2 * samples - 1
        info = {"wall_time": sum(i["wall_time"] for i in infos)}
        return dimod.SampleSet.from_samples_bqm((samples, variables), bqm, info=info)
