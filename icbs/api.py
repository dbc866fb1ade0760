"""`icbs.prune`: the one-call entry point."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from icbs.budget import Budget
from icbs.calibration import LossFn, load_batches
from icbs.layer_pruning import LayerPruner, SequentialSettings, overall_sparsity
from icbs.layers import find_prunable
from icbs.masks import parse_pattern
from icbs.pruner import Pruner, check_checkpoint_path
from icbs.report import Report
from icbs.sequential import prune_in_stages
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


def prune_layer_by_layer(
    model: nn.Module,
    calibration: Iterable,
    *,
    sparsity: float,
    method: str = "icbs",
    progress: bool = False,
    **settings: Any,
) -> dict:
    """Prune `model` in place one stage of layers at a time (`icbs.sequential`), each layer
    on the inputs of the model pruned so far, and return the run's report (settings, one
    record per layer with its reconstruction error before and after, sparsity, seconds).

    method: magnitude, wanda, sparsegpt, alps, or icbs (block steps on each layer's
        reconstruction error from `init`, `objective` "layerwise" or "refit", `budget`
        seconds of steps over the whole model).
    calibration: `(inputs, targets)` batches as for `prune` (the targets are not used).
    Other keywords are `icbs.layer_pruning.SequentialSettings` fields. On any error the
    model is handed back unchanged.
    """
    tic = time.perf_counter()
    config = SequentialSettings(sparsity=sparsity, method=method, **settings)
    if config.budget_share == "error+blocks":
        raise ValueError("budget_share='error+blocks' forecasts the errors of an LLM's decoder "
                         "blocks (icbs.llm.prune.prune_model); here use 'weights' or 'error'")
    pattern = parse_pattern(config.pattern)
    layers = find_prunable(model, config.include, config.exclude, pattern, config.sparsity,
                           grouped=True)
    batches = load_batches(calibration, layers[0].w0.device)
    pruner = LayerPruner(config, [layer.shape for layer in layers])
    was_training = model.training
    model.eval()
    try:
        records = prune_in_stages(model, batches, layers, pruner,
                                  needs_statistics=config.needs_calibration, progress=progress,
                                  dense_targets=config.dense_targets,
                                  true_sequential=config.true_sequential)
    except BaseException:
        for layer in layers:
            layer.restore_dense()
        raise
    finally:
        model.train(was_training)
    return {"settings": config.to_dict(), "layers": records,
            "prunable_weights": pruner.total_weights, "sparsity": overall_sparsity(records),
            "masks": pruner.masks, "seconds": time.perf_counter() - tic,
            "budget_used": sum(r.get("seconds_steps", 0.0) for r in records)}
