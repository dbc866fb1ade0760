"""Prune a causal language model: settings, one callback per method, and the run's report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..baselines import alps_prune, magnitude_mask, sparsegpt_prune, wanda_mask
from ..checks import finite_at_least, integer_at_least, one_of
from ..layer_stats import InputCovariance
from ..layerwise import OBJECTIVES
from ..masks import check_layer, mask_matches_pattern, parse_pattern
from ..reconstruct import reconstruct_rows, reconstruction_error
from ..settings import PruneSettings
from .data import BOS_CHOICES, calibration_windows, read_text, resolve_bos, tokenize
from .sequential import decoder_blocks, prune_sequential, select_linears

METHODS = ("magnitude", "wanda", "sparsegpt", "alps", "icbs")
INITS = ("wanda", "sparsegpt", "alps")


@dataclass(frozen=True)
class LLMPruneSettings(PruneSettings):
    """What to prune and how (the fields of `icbs.settings.PruneSettings`, and these); names
    follow Wanda / SparseGPT / llm-compressor. Raises ValueError when made with a bad value."""

    pattern: str = "per_output"
    include: tuple[str, ...] = ("*",)
    method: str = "icbs"
    nsamples: int = 128
    seqlen: int = 512
    budget: float = 600.0  # seconds of iCBS block steps over the whole model
    init: str = "wanda"  # iCBS start
    reconstruct: bool = False
    sparsegpt_columns: int = 128  # SparseGPT's lazy-update column block (its `blocksize`)
    percdamp: float = 0.01  # damping, fraction of mean(diag H)
    mask_damp: float = 0.1  # iCBS mask steps: ridge on H, fraction of mean(diag H)
    batch_size: int = 8
    bos: str = "auto"  # BOS before every calibration window: auto, yes, no
    objective: str = "layerwise"  # iCBS block steps: "layerwise" (kept weights frozen), "refit"

    def __post_init__(self):
        super().__post_init__()
        one_of("method", self.method, METHODS)
        one_of("bos", self.bos, BOS_CHOICES)
        one_of("objective", self.objective, OBJECTIVES)
        one_of("init", self.init, INITS)
        for name in ("nsamples", "seqlen", "batch_size", "sparsegpt_columns"):
            integer_at_least(name, getattr(self, name), 1)
        for name in ("budget", "percdamp", "mask_damp"):
            finite_at_least(name, getattr(self, name))

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.reconstruct


class Interrupted(Exception):
    """Raised after the layer during which a stop was requested (Ctrl-C) was finished."""


class LayerPruner:
    """The per-layer callback of `prune_sequential` for one method; keeps the masks.

    Layers in `restored` (name -> (weight, mask, record), from a checkpoint) are set to their
    saved result instead of being pruned again; `on_layer(name, weight, mask, record)` is
    called after each newly pruned layer (to checkpoint it). Setting `stop_requested` makes
    the next layer boundary raise `Interrupted`."""

    def __init__(self, settings: LLMPruneSettings, total_weights: int,
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
    def __call__(self, name: str, module: nn.Linear, cov: InputCovariance | None) -> dict:
        if self.stop_requested:
            raise Interrupted(name)
        if name in self.restored:
            weight, mask, record = self.restored[name]
            module.weight.copy_(weight.to(module.weight.device, module.weight.dtype))
            self.masks[name] = mask
            return record
        record = self._prune(name, module, cov)
        if self.on_layer is not None:
            self.on_layer(name, module.weight, self.masks[name], record)
        return record

    def _prune(self, name: str, module: nn.Linear, cov: InputCovariance | None) -> dict:
        s = self.settings
        w0 = module.weight.detach().float()
        tic = time.perf_counter()
        weight, mask = self._start(w0, cov)
        record = {"shape": list(w0.shape), "seconds_start": time.perf_counter() - tic}
        hessian = cov.hessian if cov is not None else None
        if hessian is not None:
            record["error_before"] = float(reconstruction_error(w0, weight, hessian).sum())
        if s.method == "icbs":
            from ..layerwise import improve_layer

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
        module.weight.copy_(weight.to(module.weight.dtype))
        self.masks[name] = mask.cpu()
        record["sparsity"] = 1.0 - float(mask.float().mean())
        record["zeros"] = float((module.weight == 0).float().mean())
        return record


def prunable_layers(model: nn.Module, settings: LLMPruneSettings) -> dict[str, nn.Linear]:
    """The linear layers the settings select in the model's decoder blocks."""
    prefix, blocks = decoder_blocks(model)
    layers: dict[str, nn.Linear] = {}
    for index, block in enumerate(blocks):
        layers.update(select_linears(block, f"{prefix}.{index}", settings.include,
                                     settings.exclude))
    return layers


def prune_model(model: nn.Module, tokenizer, settings: LLMPruneSettings,
                calib_paths: Sequence[str] = (), progress: bool = False,
                layer_pruner: Callable[[LLMPruneSettings, int], LayerPruner] = LayerPruner
                ) -> dict:
    """Prune `model` in place; returns the report (settings, per-layer records, times) with
    the masks under the key "masks" (name -> bool tensor). `layer_pruner(settings,
    total_weights)` makes the per-layer callback (a resumed run passes one that restores
    checkpointed layers and checkpoints new ones)."""
    pattern = parse_pattern(settings.pattern)
    layers = prunable_layers(model, settings)
    if not layers:
        raise ValueError("no linear layer matches the include/exclude patterns")
    for name, layer in layers.items():
        check_layer(name, layer.weight, pattern, settings.sparsity)
    if settings.method == "icbs":
        from ..layerwise import improve_layer  # noqa: F401  (fail before any weight is touched)
    times = {}
    tic = time.perf_counter()
    windows = None
    bos_id = resolve_bos(tokenizer, settings.bos)
    if settings.needs_calibration:
        tokens = tokenize(tokenizer, read_text(calib_paths), bos_id)
        windows = calibration_windows(tokens, settings.nsamples, settings.seqlen, settings.seed,
                                      bos_id)
    times["data"] = time.perf_counter() - tic
    pruner = layer_pruner(settings, sum(layer.weight.numel() for layer in layers.values()))
    tic = time.perf_counter()
    records = prune_sequential(model, windows, pruner, include=settings.include,
                               exclude=settings.exclude, batch_size=settings.batch_size,
                               progress=progress, restored=pruner.restored.keys())
    times["prune"] = time.perf_counter() - tic
    for key in ("seconds_start", "seconds_icbs", "seconds_steps", "seconds_reconstruct"):
        times[key.replace("seconds_", "layers_")] = sum(r.get(key, 0.0) for r in records)
    pruned = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in records)
    return {
        "settings": dataclasses.asdict(settings),
        "bos_token_id": bos_id,
        "layers": records,
        "prunable_weights": pruner.total_weights,
        "sparsity": pruned / pruner.total_weights,
        "seconds": times,
        "budget_used": times["layers_steps"],
        "masks": pruner.masks,
    }
