"""Turn what the user passed as `solver` into a `solvers.Solver`."""

from __future__ import annotations

import importlib
from typing import Any

from solvers import Solver, available, get_solver


def resolve_solver(spec: Any, params: dict | None = None) -> Solver:
    """A solver from a registered name ("anneal", "neal", ...), "dimod:<module>:<class>" (a
    dimod sampler class built without arguments), a `solvers.Solver`, or any object with a
    dimod `sample` method (a D-Wave sampler, say), which goes through the `dimod` adapter."""
    params = dict(params or {})
    if isinstance(spec, Solver):
        return spec
    if isinstance(spec, str) and spec.startswith("dimod:"):
        try:
            _, module, cls = spec.split(":")
            sampler = getattr(importlib.import_module(module), cls)()
        except (ValueError, ImportError, AttributeError) as exc:
            raise ValueError(f"cannot build sampler {spec!r} (expected dimod:<module>:<class>, "
                             f"e.g. dimod:neal:SimulatedAnnealingSampler): {exc}") from None
        return get_solver("dimod", sampler=sampler, **params)
    if isinstance(spec, str):
        if spec not in available():
            raise ValueError(f"unknown solver {spec!r}; available: {', '.join(available())}, "
                             "or dimod:<module>:<class>")
        return get_solver(spec, **params)
    if hasattr(spec, "sample"):
        return get_solver("dimod", sampler=spec, **params)
    raise ValueError(f"solver must be a name, a solvers.Solver or a dimod sampler, got {spec!r}")


def solver_label(spec: Any) -> str:
    """The name a run's settings record for what the user passed as `solver`."""
    return spec if isinstance(spec, str) else type(spec).__name__
