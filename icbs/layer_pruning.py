"""One layer at a time: the settings of a layer-by-layer run and its per-layer callback.

`LayerPruner` prunes one Linear or Conv2d layer, given the statistics of its inputs in the
model pruned so far, by one method: magnitude, Wanda, SparseGPT, ALPS, or iCBS block steps
on the layer's reconstruction error (`icbs.layerwise.improve_layer`) from one of them. The
drivers that feed it are `icbs.sequential` (any model) and `icbs.llm.sequential` (decoder
blocks of a causal LM).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .baselines import alps_prune, magnitude_mask, sparsegpt_prune, wanda_mask
from .checks import finite_at_least, integer_at_least, one_of
from .layer_stats import InputCovariance
from .layerwise import OBJECTIVES
from .masks import mask_matches_pattern, parse_pattern
from .reconstruct import reconstruct_rows, reconstruction_error
from .settings import PruneSettings

METHODS = ("magnitude", "wanda", "sparsegpt", "alps", "icbs")
INITS = ("wanda", "sparsegpt", "alps")


@dataclass(frozen=True)
class SequentialSettings(PruneSettings):
    """How each layer is pruned (the fields of `icbs.settings.PruneSettings`, and these);
    names follow Wanda / SparseGPT / llm-compressor. Raises ValueError when made with a bad
    value."""

    method: str = "icbs"
    budget: float = 600.0  # seconds of iCBS block steps over the whole model
    init: str = "wanda"  # iCBS start
    reconstruct: bool = False
    sparsegpt_columns: int = 128  # SparseGPT's lazy-update column block (its `blocksize`)
    percdamp: float = 0.01  # damping, fraction of mean(diag H)
    mask_damp: float = 0.1  # iCBS mask steps: ridge on H, fraction of mean(diag H)
    objective: str = "layerwise"  # iCBS block steps: "layerwise" (kept weights frozen), "refit"

    def __post_init__(self):
        super().__post_init__()
        one_of("method", self.method, METHODS)
        one_of("objective", self.objective, OBJECTIVES)
        one_of("init", self.init, INITS)
        integer_at_least("sparsegpt_columns", self.sparsegpt_columns, 1)
        for name in ("budget", "percdamp", "mask_damp"):
            finite_at_least(name, getattr(self, name))

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.reconstruct


def overall_sparsity(records: list[dict]) -> float:
    """The pruned fraction of all the weights in `LayerPruner` records."""
    sizes = [r["shape"][0] * r["shape"][1] for r in records]
    return sum(r["sparsity"] * n for r, n in zip(records, sizes, strict=True)) / sum(sizes)


class Interrupted(Exception):
    """Raised after the layer during which a stop was requested (Ctrl-C) was finished."""


class LayerPruner:
    """The per-layer callback of both drivers (`icbs.sequential.prune_in_stages`,
    `icbs.llm.sequential.prune_sequential`) for one method; keeps the masks.

    Layers in `restored` (name -> (weight, mask, record), from a checkpoint) are set to their
    saved result instead of being pruned again; `on_layer(name, weight, mask, record)` is
    called after each newly pruned layer (to checkpoint it). Setting `stop_requested` makes
    the next layer boundary raise `Interrupted`."""

    def __init__(self, settings: SequentialSettings, total_weights: int,
                 restored: dict | None = None, on_layer: Callable | None = None):
        self.settings = settings
        self.pattern = parse_pattern(settings.pattern)
        self.total_weights = total_weights
        self.masks: dict[str, torch.Tensor] = {}
        self.restored = restored or {}
        self.on_layer = on_layer
        self.stop_requested = False

    def _start(self, w0: torch.Tensor, cov: InputCovariance | None):
        s = self.settings
        start = s.init if s.method == "icbs" else s.method
        if start == "magnitude":
            mask = magnitude_mask(w0, s.sparsity, self.pattern)
        elif start == "wanda":
            mask = wanda_mask(w0, cov.column_norms(), s.sparsity, self.pattern)
        elif start == "alps":
            return alps_prune(w0, cov.hessian, s.sparsity, self.pattern, damp=s.percdamp)
        else:
            return sparsegpt_prune(w0, cov.hessian, s.sparsity, self.pattern, s.sparsegpt_columns,
                                   s.percdamp)
        return w0 * mask, mask

    @torch.no_grad()
    def __call__(self, name: str, module: nn.Module,
                 cov: InputCovariance | list[InputCovariance] | None) -> dict:
        """Prune `module` given its input statistics (a list, one per group, for a grouped
        convolution: each group of output channels is pruned on its own inputs, with the
        pattern's counts per group)."""
        if self.stop_requested:
            raise Interrupted(name)
        if name in self.restored:
            weight, mask, record = self.restored[name]
            module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight.device,
                                                                        module.weight.dtype))
            self.masks[name] = mask
            return record
        record = self._prune(name, module, cov)
        if self.on_layer is not None:
            self.on_layer(name, module.weight, self.masks[name], record)
        return record

    def _prune(self, name: str, module: nn.Module,
               cov: InputCovariance | list[InputCovariance] | None) -> dict:
        w0 = module.weight.detach().float().reshape(module.weight.shape[0], -1)
        if isinstance(cov, list):  # a grouped convolution: one problem per group of rows
            rows = w0.shape[0] // len(cov)
            parts = [self._solve(name, w0[g * rows:(g + 1) * rows], c) for g, c in enumerate(cov)]
            weight = torch.cat([p[0] for p in parts])
            mask = torch.cat([p[1] for p in parts])
            record = {key: sum(p[2][key] for p in parts) for key in parts[0][2]
                      if key != "convergence"}
            record["groups"] = len(cov)
        else:
            weight, mask, record = self._solve(name, w0, cov)
        record["shape"] = list(w0.shape)
        module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight.dtype))
        self.masks[name] = mask.cpu()
        record["sparsity"] = 1.0 - float(mask.float().mean())
        record["zeros"] = float((module.weight == 0).float().mean())
        return record

    def _solve(self, name: str, w0: torch.Tensor, cov: InputCovariance | None):
        """(weight with zeros where pruned, mask, record) of one weight matrix."""
        s = self.settings
        tic = time.perf_counter()
        weight, mask = self._start(w0, cov)
        record = {"seconds_start": time.perf_counter() - tic}
        hessian = cov.hessian if cov is not None else None
        if hessian is not None:
            record["error_before"] = float(reconstruction_error(w0, weight, hessian).sum())
        if s.method == "icbs":
            from .layerwise import improve_layer

            result = improve_layer(
                w0, hessian, mask, weight=weight, pattern=self.pattern, sparsity=s.sparsity,
                seconds=s.budget * w0.numel() / self.total_weights, block_size=s.block_size,
                solver=s.solver, seed=s.seed, reconstruct=s.reconstruct, damp=s.percdamp,
                mask_damp=s.mask_damp, objective=s.objective)
            weight, mask = result.weight.float(), result.mask
            record.update(steps=result.steps, accepted=result.accepted,
                          seconds_icbs=result.seconds, seconds_steps=result.step_seconds)
            if result.convergence:
                record["convergence"] = result.convergence
        elif s.reconstruct:
            tic = time.perf_counter()
            weight = reconstruct_rows(w0, weight, hessian, mask, s.percdamp)
            record["seconds_reconstruct"] = time.perf_counter() - tic
        if not mask_matches_pattern(mask.cpu(), self.pattern, s.sparsity):
            raise AssertionError(f"{name}: mask does not satisfy pattern {self.pattern}")
        weight = weight * mask
        if hessian is not None:
            record["error_after"] = float(reconstruction_error(w0, weight, hessian).sum())
        return weight, mask, record
