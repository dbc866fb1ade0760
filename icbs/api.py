"""`icbs.prune`: the one-call entry point."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from icbs.budget import Budget
from icbs.calibration import LossFn
from icbs.pruner import Pruner, check_checkpoint_path
from icbs.report import Report
from icbs.settings import Settings
from icbs.solver_choice import solver_label


def prune(
    model: nn.Module,
    calibration: Iterable,
    *,
    sparsity: float,
    budget: Budget | float | None = None,
    loss_fn: LossFn | None = None,
    solver: Any = "anneal",
    checkpoint: str | Path | None = None,
    resume: bool = True,
    progress: bool = False,
    **settings: Any,
) -> Report:
    """Prune `model` in place with iCBS and return the run's report.

    calibration: an iterable of `(inputs, targets)` batches (a DataLoader works).
    budget: a `Budget`, or seconds (default: one pass over the prunable weights).
    loss_fn: a loss averaging over the batch, `F.cross_entropy` by default.
    solver: a solver name (`solvers.available()`), "dimod:<module>:<class>", a
        `solvers.Solver`, or any dimod sampler (block size is capped at its maximum).
    checkpoint: file written during the run; with `resume`, a run whose checkpoint exists
        continues from it.
    Other keywords are `Settings` fields (pattern, init, objective, block_size, seed, ...).
    """
    if budget is None:
        budget = Budget(passes=1)
    elif not isinstance(budget, Budget):
        budget = Budget(seconds=float(budget))
    config = Settings(sparsity=sparsity, solver=solver_label(solver), **settings)
    check_checkpoint_path(checkpoint)
    pruner = Pruner(model, calibration, config, loss_fn=loss_fn, solver=solver)
    try:
        if checkpoint is not None and resume and Path(checkpoint).exists():
            pruner.load_checkpoint(checkpoint)
        return pruner.run(budget, checkpoint=checkpoint, progress=progress)
    finally:
        pruner.finish()
