"""`greedy`: best-improvement swap descent inside groups (the CBS swap search)."""

from __future__ import annotations

from typing import Any

import numpy as np

from solvers import _kernels as K
from solvers.anneal import row_max
from solvers.base import Solver, register
from solvers.problem import CardinalityQUBO


@register("greedy")
class GreedySwap(Solver):
    """From x0 (or the magnitude start: smallest Q_ii per group), apply the best swap of a
    1 and a 0 inside a group, group after group, until no swap lowers the energy.

    Parameters
    ----------
    max_swaps : stop after this many swaps (None: until a local minimum).

    info: wall_time, iterations (swaps made), passes over the groups, restarts (always 1).
    """

    def __init__(self, max_swaps: int | None = None) -> None:
        if max_swaps is not None and max_swaps < 0:
            raise ValueError(f"max_swaps must be >= 0, got {max_swaps}")
        self.max_swaps = max_swaps

    def _solve(
        self, problem: CardinalityQUBO, x0: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, Any]]:
        x = (x0 if x0 is not None else problem.magnitude_start()).copy()
        f = K.fields(problem.Q, x)
        perm, gstart, _ = K.layout(x, problem.groups, problem.k, problem.sizes)
        limit = np.iinfo(np.int64).max if self.max_swaps is None else self.max_swaps
        _, swaps, passes = K.polish_swaps(problem.Q, x, f, perm, gstart, problem.k,
                                          problem.sizes, row_max(problem), limit)
        return x, {"iterations": int(swaps), "passes": int(passes), "restarts": 1}

    def solve_stack(self, stack, x0, seeds=None):
        """The stack in one kernel call: the same answers as `solve` on each problem."""
        x = stack.check_states(x0, what="warm start x0")
        perm = np.argsort(2 * stack.groups + (1 - x), axis=1, kind="stable").astype(np.int64)
        gstart = np.zeros_like(stack.sizes)
        gstart[:, 1:] = np.cumsum(stack.sizes, axis=1)[:, :-1]
        limit = np.iinfo(np.int64).max if self.max_swaps is None else self.max_swaps
        energies = K.polish_many(stack.Q, x, perm, gstart, stack.k, stack.sizes, limit)
        return stack.check_states(x, what="the greedy answer"), energies
