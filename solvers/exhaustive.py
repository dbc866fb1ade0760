"""`exhaustive`: exact minimum by enumerating every feasible state (small problems only)."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from solvers.base import Solver, register
from solvers.problem import CardinalityQUBO


def _group_patterns(members: np.ndarray, k: int, n: int) -> np.ndarray:
    """All 0/1 rows over n variables with exactly k ones among `members` (others 0)."""
    combos = list(combinations(range(members.size), k))
    out = np.zeros((len(combos), n), dtype=np.int8)
    for r, c in enumerate(combos):
        out[r, members[list(c)]] = 1
    return out


def feasible_states(problem: CardinalityQUBO, chunk: int = 65536):
    """Yield every feasible state, as int8 arrays of shape (<= chunk, n), in a fixed order."""
    n = problem.n
    pats = [_group_patterns(np.flatnonzero(problem.groups == g), int(problem.k[g]), n)
            for g in range(problem.num_groups)]
    radices = np.array([p.shape[0] for p in pats], dtype=np.int64)
    total = problem.num_feasible()
    for s0 in range(0, total, chunk):
        idx = np.arange(s0, min(total, s0 + chunk), dtype=np.int64)
        X = np.zeros((idx.size, n), dtype=np.int8)
        rest = idx
        for p, r in zip(pats, radices, strict=True):
            X += p[rest % r]
            rest = rest // r
        yield X


@register("exhaustive")
class Exhaustive(Solver):
    """Exact minimum over all prod_g C(|g|, k_g) feasible states; ties go to the first found.

    Parameters
    ----------
    max_states : refuse (ValueError) problems with more feasible states than this
        (default 2**21, about a second).

    info: wall_time, iterations (states evaluated), restarts (1).
    """

    def __init__(self, max_states: int = 2**21) -> None:
        self.max_states = int(max_states)

    def _solve(
        self, problem: CardinalityQUBO, x0: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, Any]]:
        total = problem.num_feasible()
        if total > self.max_states:
            raise ValueError(
                f"exhaustive: the problem has {total} feasible states, more than "
                f"max_states={self.max_states}; use 'anneal' or 'greedy'"
            )
        best_x, best_e = None, np.inf
        for X in feasible_states(problem):
            e = problem.energies(X)
            i = int(np.argmin(e))
            if e[i] < best_e:
                best_e, best_x = e[i], X[i].copy()
        return best_x, {"iterations": total, "restarts": 1}
