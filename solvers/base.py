"""The solver interface shared by every backend, and the registry behind `get_solver`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from solvers.problem import CardinalityQUBO, QUBOStack


@dataclass
class SolveResult:
    """A feasible answer: `x` (int8, 1 = pruned), its `energy` (const included), and `info`."""

    x: np.ndarray
    energy: float
    info: dict[str, Any] = field(default_factory=dict)


class Solver:
    """Base class: a `name`, documented parameters with defaults, and `solve`.

    Subclasses implement `_solve(problem, x0, rng)` returning `(x, info)`; `solve` checks the
    warm start, times the call, verifies feasibility and computes the energy, so every backend
    returns results of the same shape.
    """

    name: str = ""
    # Largest number of variables the backend accepts (None: no limit).
    max_variables: int | None = None

    def solve(
        self, problem: CardinalityQUBO, x0: np.ndarray | None = None, seed: int | None = None
    ) -> SolveResult:
        import time

        if self.max_variables is not None and problem.n > self.max_variables:
            raise ValueError(
                f"solver {self.name!r} accepts at most {self.max_variables} variables, "
                f"the problem has {problem.n}; use a smaller block size"
            )
        if x0 is not None:
            x0 = problem.check_state(x0, what="warm start x0")
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        x, info = self._solve(problem, x0, rng)
        info["wall_time"] = time.perf_counter() - start
        x = np.asarray(x, dtype=np.int8)
        if not problem.is_feasible(x):
            raise RuntimeError(f"solver {self.name!r} returned an infeasible state")
        return SolveResult(x=x, energy=problem.energy(x), info=info)

    def solve_many(
        self,
        problems: list[CardinalityQUBO],
        x0s: list[np.ndarray | None] | None = None,
        seeds: list[int | None] | None = None,
    ) -> list[SolveResult]:
        """Solve independent problems (`x0s` and `seeds` one per problem); a backend that can
        batch them (one kernel call, one sampler submission) overrides this loop."""
        x0s = [None] * len(problems) if x0s is None else x0s
        seeds = [None] * len(problems) if seeds is None else seeds
        if not len(x0s) == len(seeds) == len(problems):
            raise ValueError(f"solve_many needs one x0 and one seed per problem, got "
                             f"{len(problems)} problems, {len(x0s)} x0s, {len(seeds)} seeds")
        return [self.solve(p, x0, s) for p, x0, s in zip(problems, x0s, seeds, strict=True)]

    def solve_stack(
        self, stack: QUBOStack, x0: np.ndarray, seeds: list[int | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Solve the problems of a `QUBOStack` from the warm starts `x0` (P, n): the answers
        (P, n) int8 and their energies (P,). A backend with a kernel over the stack (greedy)
        overrides this loop over `solve_many`."""
        x0 = stack.check_states(x0, what="warm start x0")
        results = self.solve_many([stack.problem(i) for i in range(len(stack))], list(x0),
                                  seeds)
        return np.stack([r.x for r in results]), np.array([r.energy for r in results])

    def _solve(
        self, problem: CardinalityQUBO, x0: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def warm_up(self) -> None:
        """Solve a tiny problem once, so that JIT compilation (or loading its cache) happens
        here and not inside a timed budget."""
        from solvers.problem import CardinalityQUBO

        self.solve(CardinalityQUBO(np.eye(4) - 0.5, 2), seed=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_REGISTRY: dict[str, Callable[..., Solver]] = {}


def register(name: str) -> Callable[[type[Solver]], type[Solver]]:
    """Class decorator: make a solver available as `get_solver(name, **params)`."""

    def wrap(cls: type[Solver]) -> type[Solver]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names accepted by `get_solver`."""
    return sorted(_REGISTRY)


def get_solver(name: str, **params: Any) -> Solver:
    """Build the solver registered under `name` with its parameters."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](**params)
