"""Layer-by-layer pruning of any model: each stage of layers is pruned on the inputs that
the model pruned so far gives it.

A stage is the prunable layers under one element of a `nn.ModuleList` (a transformer block,
a residual block); a layer outside every ModuleList (a stem, a head) is a stage of its own.
Stages are taken in the order the forward pass first reaches them. For each stage one pass
over the calibration batches, stopped once the stage's last layer has run, accumulates
X X^T of its layers' inputs (Conv2d inputs unfolded into patches); then each layer is pruned
by the callback. In call order (`true_sequential`) a stage goes group by group instead
(`icbs.calibration.call_groups`: layers fed the same tensor), each group's statistics taken
on the outputs of the groups pruned before it, one partial pass per group.
`icbs.llm.sequential` is the same idea for causal LMs, running one decoder block at a time
on captured block inputs instead of the model from its start.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import call_groups, forward_order, input_statistics
from .layer_stats import InputCovariance
from .layers import PrunableLayer

logger = logging.getLogger(__name__)

LayerCallback = Callable[[str, nn.Module, "InputCovariance | None"], dict]


def _stage_of(name: str, list_prefixes: Sequence[str]) -> str:
    """The deepest ModuleList element `name` lies under, else `name` itself."""
    best = ""
    for prefix in list_prefixes:
        if name.startswith(prefix + ".") and len(prefix) > len(best):
            best = prefix
    if not best:
        return name
    return best + "." + name[len(best) + 1:].split(".")[0]


def stages(model: nn.Module, layers: Sequence[PrunableLayer],
           batch: tuple) -> list[list[PrunableLayer]]:
    """The layers grouped into stages, in the order a forward pass on the `(inputs,
    targets)` batch first calls them (`forward_order`: raises on a layer never called)."""
    order, _ = forward_order(model, list(layers), batch)
    by_name = {layer.name: layer for layer in layers}
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    grouped: dict[str, list[PrunableLayer]] = {}
    for name in order:
        grouped.setdefault(_stage_of(name, lists), []).append(by_name[name])
    return list(grouped.values())


@torch.no_grad()
def prune_in_stages(model: nn.Module, batches: list, layers: Sequence[PrunableLayer],
                    prune_layer: LayerCallback, *, needs_statistics: bool = True,
                    progress: bool = False, dense_targets: bool = False,
                    true_sequential: bool = False) -> list[dict]:
    """Prune `layers` stage by stage (see the module docstring); `prune_layer(name, module,
    statistics)` rewrites `module.weight` and returns a record. Without `needs_statistics`
    no calibration pass is made and statistics are None. With `dense_targets` a copy of the
    dense model runs beside it and the statistics of ungrouped layers are paired with the
    dense model's inputs (`input_statistics`), for fitting to the dense model's outputs.
    With `true_sequential` a stage's layers go group by group in call order. Returns the
    records in the order the layers were pruned, each with the layer's name added."""
    records = []
    stage_list = stages(model, layers, batches[0])
    dense = copy.deepcopy(model) if dense_targets and needs_statistics else None
    for index, stage in enumerate(tqdm(stage_list, desc="stages", disable=not progress)):
        parts = (call_groups(model, stage, batches[0]) if true_sequential and needs_statistics
                 else [stage])
        for part in parts:
            stats = (input_statistics(model, part, batches, stop_after=True, dense=dense)
                     if needs_statistics else {})
            for layer in part:
                records.append({"name": layer.name, **prune_layer(layer.name, layer.module,
                                                                  stats.get(layer.name))})
        logger.info("pruned stage %d/%d (%d layers in %d groups)", index + 1, len(stage_list),
                    len(stage), len(parts))
    return records
