"""Sequential pruning driver: one decoder block at a time, on calibration activations.

The inputs of decoder block 0 are captured once, whatever the block's call signature
(positional and keyword arguments: position embeddings, attention masks, caches). Then for each
block: its linear layers' input statistics are accumulated, its layers are pruned by a
callback (all of a block's layers at once, so that they can run in parallel), and the pruned
block is re-run on its inputs to produce the next block's inputs. Beyond the model itself
(all of it in memory, or one block at a time with `icbs.llm.lazy`), the driver holds one
block's statistics (cols x cols per distinct layer input) and the calibration activations of
one block.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layer_stats import InputCovariance

logger = logging.getLogger(__name__)

LayerCallback = Callable[[str, nn.Linear, "InputCovariance | None"], dict]


class _StopForward(Exception):
    """Raised by the capture hook once decoder block 0 has its inputs."""


@dataclass
class BlockInputs:
    """Inputs of a decoder block for each calibration batch: hidden states plus the other
    positional and keyword arguments the model passed to the block."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]

    def calls(self):
        """(hidden, args, kwargs) per batch."""
        return zip(self.hidden, self.args, self.kwargs, strict=True)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the model's decoder blocks: the longest ModuleList
    whose length is the config's num_hidden_layers (or the longest one)."""
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)]
    if not lists:
        raise ValueError("model has no nn.ModuleList of decoder blocks")
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    matching = [item for item in lists if len(item[1]) == layers] or lists
    return max(matching, key=lambda item: len(item[1]))


def select_linears(block: nn.Module, prefix: str, include: Sequence[str] = ("*",),
                   exclude: Sequence[str] = ()) -> dict[str, nn.Linear]:
    """The block's nn.Linear layers by full name, filtered by fnmatch include/exclude patterns."""
    selected = {}
    for name, mod in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if (isinstance(mod, nn.Linear)
                and any(fnmatch.fnmatch(full, pat) for pat in include)
                and not any(fnmatch.fnmatch(full, pat) for pat in exclude)):
            selected[full] = mod
    return selected


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor,
                         batch_size: int = 8) -> BlockInputs:
    """Run the model on `windows` (token ids) until `block` is called; keep its arguments."""
    device = next(model.parameters()).device
    captured = BlockInputs([], [], [])

    def hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            captured.hidden.append(args[0])
            captured.args.append(tuple(args[1:]))
        else:
            captured.hidden.append(kwargs.pop("hidden_states"))
            captured.args.append(())
        captured.kwargs.append(kwargs)
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                continue
            raise RuntimeError("the decoder block was never called during the forward pass")
    finally:
        handle.remove()
    return captured


def _hidden_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's output hidden states for every captured batch."""
    return [_hidden_output(block(hidden, *args, **kwargs)) for hidden, args, kwargs in
            inputs.calls()]


@torch.no_grad()
def collect_statistics(block: nn.Module, layers: dict[str, nn.Linear],
                       inputs: BlockInputs) -> dict[str, InputCovariance]:
    """X X^T / tokens of each layer's inputs over all batches. Layers fed the very same tensor
    in a call (q/k/v, gate/up) share one accumulator."""
    covariances: dict[str, InputCovariance] = {}
    leaders: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0]
            for tensor, leader in seen:
                if tensor is x:
                    leaders[name] = leader
                    return
            seen.append((x, name))
            if name not in covariances:
                covariances[name] = InputCovariance(x.shape[-1], device=x.device)
            covariances[name].add_batch(x)
        return hook

    handles = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in layers.items()]
    try:
        for hidden, args, kwargs in inputs.calls():
            block(hidden, *args, **kwargs)
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in covariances and name not in leaders]
    if missing:
        raise ValueError(f"no calibration inputs reached {missing}")
    return {name: covariances[leaders.get(name, name)] for name in layers}


BlockCallback = Callable[[dict[str, nn.Linear], dict[str, InputCovariance]], list[dict]]


def per_layer(prune_layer: LayerCallback) -> BlockCallback:
    """A block callback that calls `prune_layer(name, module, statistics)` on each layer."""
    def prune_block(layers, stats):
        return [prune_layer(name, module, stats.get(name)) for name, module in layers.items()]
    return prune_block


@torch.no_grad()
def prune_sequential(model: nn.Module, windows: torch.Tensor | None, prune_block: BlockCallback,
                     *, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                     batch_size: int = 8, progress: bool = True,
                     restored: Container[str] = (),
                     load_block: Callable[[int], None] | None = None,
                     block_done: Callable[[int], None] | None = None) -> list[dict]:
    """Prune the linear layers of every decoder block, block by block.

    `prune_block(layers, statistics)` rewrites the `weight` of every module of `layers`
    (name -> module, in the block's order) given `statistics` (name -> InputCovariance) and
    returns one record per layer for the report (`per_layer` makes one from a per-layer
    callback). With `windows=None` no calibration pass is made and statistics are empty.
    Layers in `restored` get no statistics (the callback sets their saved result), and a
    block made only of them is just run forward. `load_block(index)` is called before block
    `index` is used and `block_done(index)` after its outputs were computed (a model held one
    block at a time, `icbs.llm.lazy`). Returns the records in order, each with the layer's
    name added.
    """
    prefix, blocks = decoder_blocks(model)
    inputs = None if windows is None else capture_block_inputs(model, blocks[0], windows,
                                                               batch_size)
    records = []
    for index in tqdm(range(len(blocks)), desc="decoder blocks", disable=not progress):
        if load_block is not None:
            load_block(index)
        block = blocks[index]
        layers = select_linears(block, f"{prefix}.{index}", include, exclude)
        fresh = [name for name in layers if name not in restored]
        stats = collect_statistics(block, layers, inputs) if inputs and fresh else {}
        records += [{"name": name, **record} for name, record in
                    zip(layers, prune_block(layers, stats), strict=True)]
        del stats
        if inputs is not None and index + 1 < len(blocks):
            inputs.hidden = run_block(block, inputs)
        if block_done is not None:
            block_done(index)
        logger.info("pruned block %d/%d (%d layers)", index + 1, len(blocks), len(layers))
    return records
