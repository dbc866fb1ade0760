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

from ..calibration import groups_by_input
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
def _call_capturing(block: nn.Module, layers: dict[str, nn.Linear], hidden: torch.Tensor,
                    args: tuple, kwargs: dict, stop: bool = False
                    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(the block's output hidden states, each layer's input by name, in call order) of one
    call of the block. With `stop` the call ends as soon as every layer of `layers` has its
    input, and the output is None."""
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, hook_args):
            captured[name] = hook_args[0]
            if stop and len(captured) == len(layers):
                raise _StopForward
        return hook

    handles = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in layers.items()]
    try:
        output = _hidden_output(block(hidden, *args, **kwargs))
    except _StopForward:
        output = None
    finally:
        for handle in handles:
            handle.remove()
    return output, captured


@torch.no_grad()
def call_groups(block: nn.Module, layers: dict[str, nn.Linear], inputs: BlockInputs
                ) -> list[list[str]]:
    """The layers' names in the order the block calls them (on the first calibration batch),
    grouped by the tensor they are fed (`icbs.calibration.groups_by_input`: q/k/v, gate/up)."""
    hidden, args, kwargs = next(iter(inputs.calls()))
    _, captured = _call_capturing(block, layers, hidden, args, kwargs)
    missing = [name for name in layers if name not in captured]
    if missing:
        raise ValueError(f"no calibration inputs reached {missing}")
    return groups_by_input(captured)


@torch.no_grad()
def dense_pass(block: nn.Module, layers: dict[str, nn.Linear], dense: list[torch.Tensor],
               inputs: BlockInputs) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(the block's outputs, its layers' inputs) for each batch of `dense`, the block's
    inputs in the dense model (the block still dense; the other call arguments those of
    `inputs`)."""
    calls = [_call_capturing(block, layers, hidden, args, kwargs)
             for hidden, (_, args, kwargs) in zip(dense, inputs.calls(), strict=True)]
    return [output for output, _ in calls], [captured for _, captured in calls]


@torch.no_grad()
def collect_statistics(block: nn.Module, layers: dict[str, nn.Linear], inputs: BlockInputs,
                       dense_inputs: list[dict[str, torch.Tensor]] | None = None,
                       stop: bool = False) -> dict[str, InputCovariance]:
    """X X^T / tokens of each layer's inputs over all batches. Layers fed the very same tensor
    in a call (q/k/v, gate/up) share one accumulator. With `dense_inputs` (each batch's layer
    inputs in the dense model, `dense_pass`) the statistics are paired with them on the same
    tokens (`InputCovariance.cross`). With `stop` each call of the block ends once `layers`
    have their inputs (they are the block's first layers still to be pruned)."""
    covariances: dict[str, InputCovariance] = {}
    leaders: dict[str, str] = {}
    for batch, (hidden, args, kwargs) in enumerate(inputs.calls()):
        _, layer_inputs = _call_capturing(block, layers, hidden, args, kwargs, stop)
        first: dict[int, str] = {}
        for name, x in layer_inputs.items():
            leader = first.setdefault(id(x), name)
            if leader != name:
                leaders[name] = leader
                continue
            if name not in covariances:
                covariances[name] = InputCovariance(x.shape[-1], device=x.device,
                                                    paired=dense_inputs is not None)
            covariances[name].add_batch(x, None if dense_inputs is None
                                        else dense_inputs[batch][name])
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
                     block_done: Callable[[int], None] | None = None,
                     dense_targets: bool = False, true_sequential: bool = False) -> list[dict]:
    """Prune the linear layers of every decoder block, block by block.

    `prune_block(layers, statistics)` rewrites the `weight` of every module of `layers`
    (name -> module, in the block's order) given `statistics` (name -> InputCovariance) and
    returns one record per layer for the report (`per_layer` makes one from a per-layer
    callback). With `windows=None` no calibration pass is made and statistics are empty.
    Layers in `restored` get no statistics (the callback sets their saved result), and a
    block made only of them is just run forward.

    By default a block's statistics are taken in one pass, all its layers on the block
    still dense, and the callback gets the whole block. With `true_sequential` it gets the
    block's layers group by group in call order (`call_groups`: q/k/v, o, gate/up, down),
    each group's statistics taken on the outputs of the groups pruned before it (SparseGPT's
    "true sequential"; a partial forward per group). With `dense_targets` the dense model's
    activations are carried beside the pruned model's and the statistics are paired with
    them (`collect_statistics`), so that the callback can fit each layer to the dense
    model's outputs rather than to the dense weights on the pruned model's inputs (which
    leaves the error made upstream uncorrected); the layers then always go group by group,
    since a layer fit to the dense outputs on inputs from dense layers before it would
    correct again what those layers correct once pruned. The dense stream holds one block's
    layer inputs for every calibration batch. `load_block(index)` is called before block
    `index` is used and `block_done(index)` after its outputs were computed (a model held one
    block at a time, `icbs.llm.lazy`). Returns the records in the blocks' layer order, each
    with the layer's name added.
    """
    prefix, blocks = decoder_blocks(model)
    inputs = None if windows is None else capture_block_inputs(model, blocks[0], windows,
                                                               batch_size)
    dense = None if inputs is None or not dense_targets else list(inputs.hidden)
    in_call_order = true_sequential or dense_targets
    records = []
    for index in tqdm(range(len(blocks)), desc="decoder blocks", disable=not progress):
        if load_block is not None:
            load_block(index)
        block = blocks[index]
        layers = select_linears(block, f"{prefix}.{index}", include, exclude)
        fresh = [name for name in layers if name not in restored]
        dense_inputs = None
        if dense is not None:  # before any layer of the block is pruned or restored
            dense, dense_inputs = dense_pass(block, layers, dense, inputs)
        groups = (call_groups(block, layers, inputs) if in_call_order and inputs is not None
                  and fresh else [list(layers)])
        by_name = {}
        for group in groups:
            members = {name: layers[name] for name in group}
            stats = {}
            if inputs is not None and any(name not in restored for name in group):
                stats = collect_statistics(block, members, inputs, dense_inputs,
                                           stop=len(groups) > 1)
            by_name.update(zip(group, prune_block(members, stats), strict=True))
            del stats
        records += [{"name": name, **by_name[name]} for name in layers]
        del dense_inputs
        if inputs is not None and index + 1 < len(blocks):
            inputs.hidden = run_block(block, inputs)
        if block_done is not None:
            block_done(index)
        logger.info("pruned block %d/%d (%d layers)", index + 1, len(blocks), len(layers))
    return records
