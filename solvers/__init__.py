"""Cardinality-constrained QUBOs and their solvers (torch-free).

    from solvers import CardinalityQUBO, get_solver
    problem = CardinalityQUBO(Q, k=32)             # one group, 32 ones
    result = get_solver("anneal").solve(problem, x0=mask, seed=0)

Solvers: exhaustive, greedy, anneal (numba swap annealing), neal and dimod (penalty model
+ repair). `SwapAnnealSampler` exposes `anneal` as a `dimod.Sampler`.
"""

from solvers import anneal, exhaustive, greedy, penalty  # noqa: F401  (register solvers)
from solvers.base import Solver, SolveResult, available, get_solver, register
from solvers.ocean import SwapAnnealSampler
from solvers.problem import CardinalityQUBO, QUBOStack

__all__ = [
    "CardinalityQUBO",
    "QUBOStack",
    "SolveResult",
    "Solver",
    "SwapAnnealSampler",
    "available",
    "get_solver",
    "register",
]
