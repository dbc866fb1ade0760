"""Cardinality-constrained QUBOs and their solvers (torch-free)."""

from solvers.base import SolveResult, Solver, available, get_solver, register

__all__ = ["SolveResult", "Solver", "available", "get_solver", "register"]
