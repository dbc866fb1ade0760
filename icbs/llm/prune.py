"""Prune a causal language model block by block: its settings and the run's report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..checks import integer_at_least, one_of
from ..layer_pruning import (
    BUDGET_SHARES,
    INITS,
    METHODS,
    Interrupted,
    LayerPruner,
    SequentialSettings,
    overall_sparsity,
)
from ..masks import check_layer, parse_pattern
from .data import BOS_CHOICES, calibration_windows, read_text, resolve_bos, tokenize
from .error_forecast import FORECAST_WINDOWS, forecast_block_errors
from .sequential import decoder_blocks, prune_sequential, select_linears

__all__ = ["BUDGET_SHARES", "INITS", "METHODS", "Interrupted", "LLMPruneSettings", "LayerPruner",
           "prune_model", "prunable_layers"]


@dataclass(frozen=True)
class LLMPruneSettings(SequentialSettings):
    """A causal LM pruned block by block: the fields of `SequentialSettings`, and the
    calibration windows. Raises ValueError when made with a bad value."""

    pattern: str = "per_output"
    include: tuple[str, ...] = ("*",)
    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    bos: str = "auto"  # BOS before every calibration window: auto, yes, no

    def __post_init__(self):
        super().__post_init__()
        one_of("bos", self.bos, BOS_CHOICES)
        for name in ("nsamples", "seqlen", "batch_size"):
            integer_at_least(name, getattr(self, name), 1)


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
                layer_pruner: Callable[[LLMPruneSettings, list], LayerPruner] = LayerPruner,
                load_block: Callable[[int], None] | None = None,
                block_done: Callable[[int], None] | None = None,
                release_block: Callable[[int], None] | None = None) -> dict:
    """Prune `model` in place; returns the report (settings, per-layer records, times) with
    the masks under the key "masks" (name -> bool tensor). `layer_pruner(settings, shapes)`
    (shapes: every prunable layer's (rows, cols)) makes the layers' callback (a resumed run
    passes one that restores checkpointed layers and checkpoints new ones; a distributed run
    one with a Ray executor). `load_block` / `block_done`: see `prune_sequential` (a model
    held one block at a time, `icbs.llm.lazy.LazyModel`); `release_block(index)` drops
    block `index` again after the dense pass of `budget_share="error+blocks"`'s forecast
    (which must not call `block_done`: that one saves the pruned block)."""
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
    pruner = layer_pruner(settings, [tuple(layer.weight.shape) for layer in layers.values()])
    if settings.method == "icbs" and settings.budget_share == "error+blocks":
        tic = time.perf_counter()
        pruner.block_forecast = forecast_block_errors(
            model, windows[:FORECAST_WINDOWS], settings.sparsity, settings.pattern,
            include=settings.include, exclude=settings.exclude,
            batch_size=settings.batch_size, load_block=load_block,
            release_block=release_block)
        times["forecast"] = time.perf_counter() - tic
    tic = time.perf_counter()
    records = prune_sequential(model, windows, pruner.prune_block, include=settings.include,
                               exclude=settings.exclude, batch_size=settings.batch_size,
                               progress=progress, restored=pruner.restored.keys(),
                               load_block=load_block, block_done=block_done,
                               dense_targets=settings.dense_targets,
                               true_sequential=settings.true_sequential)
    times["prune"] = time.perf_counter() - tic
    for key in ("seconds_start", "seconds_icbs", "seconds_steps", "seconds_reconstruct"):
        times[key.replace("seconds_", "layers_")] = sum(r.get(key, 0.0) for r in records)
    return {
        "settings": dataclasses.asdict(settings),
        "bos_token_id": bos_id,
        "layers": records,
        "prunable_weights": pruner.total_weights,
        "sparsity": overall_sparsity(records),
        "seconds": times,
        "budget_used": times["layers_steps"],
        "block_forecast": {block: error for block, (error, _) in pruner.block_forecast.items()},
        "masks": pruner.masks,
    }
