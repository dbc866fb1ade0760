"""Calibration batches and the passes over them: input statistics, losses, per-sample signals."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from icbs.layer_stats import InputCovariance
from icbs.layers import PrunableLayer, input_matrix, output_matrix

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load_batches(calibration: Iterable, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Materialize `(inputs, targets)` batches on `device`, refusing empty or non-finite data."""
    batches = []
    for i, batch in enumerate(calibration):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"calibration batch {i} must be an (inputs, targets) pair")
        inputs, targets = (torch.as_tensor(t).to(device) for t in batch)
        if inputs.is_floating_point() and not torch.isfinite(inputs).all():
            raise ValueError(f"calibration batch {i} has NaN or Inf inputs")
        if len(inputs) == 0:
            continue
        batches.append((inputs, targets))
    if not batches:
        raise ValueError("calibration data is empty: pass at least one (inputs, targets) batch")
    return batches


_RUN_ERRORS = (RuntimeError, IndexError, ValueError, TypeError)


def _cannot_run(batch: tuple, exc: Exception) -> ValueError:
    inputs, targets = batch
    return ValueError(f"the model cannot be run on calibration batch 0 (inputs "
                      f"{tuple(inputs.shape)}, targets {tuple(targets.shape)}): {exc}")


@torch.no_grad()
def forward_order(model: nn.Module, layers: list[PrunableLayer],
                  batch: tuple) -> tuple[list[str], torch.Tensor]:
    """Run the model on one `(inputs, targets)` batch: the names of `layers` in the order
    the pass first calls them, and the output. Raises ValueError when the model cannot run
    on the batch or a layer is never called (it would get no statistics or gradient)."""
    order: list[str] = []
    handles = [layer.module.register_forward_hook(
        lambda module, args, out, name=layer.name: order.append(name)) for layer in layers]
    try:
        output = model(batch[0])
    except _RUN_ERRORS as exc:
        raise _cannot_run(batch, exc) from None
    finally:
        for handle in handles:
            handle.remove()
    reached = list(dict.fromkeys(order))
    missing = [layer.name for layer in layers if layer.name not in reached]
    if missing:
        raise ValueError(f"layers never used in the model's forward pass: {missing}; exclude "
                         f"them (exclude=[...])")
    return reached, output


def check_forward(model: nn.Module, layers: list[PrunableLayer], batches: list,
                  loss_fn: LossFn) -> None:
    """Run the dense model on the first calibration batch: it must run, reach every
    prunable layer (`forward_order`) and give a finite loss."""
    _, output = forward_order(model, layers, batches[0])
    try:
        with torch.no_grad():
            loss = loss_fn(output, batches[0][1])
    except _RUN_ERRORS as exc:
        raise _cannot_run(batches[0], exc) from None
    if not torch.isfinite(torch.as_tensor(loss)).all():
        raise ValueError(f"the dense model's loss on calibration batch 0 is {float(loss)}")


class _StopForward(Exception):
    """Raised once the last layer whose inputs a pass needs has run."""


def groups_by_input(captured: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names (in call order) grouped by the tensor they were fed: layers fed the very same
    tensor (q/k/v, gate/up, a residual block's first convolution and its shortcut) form one
    group, at its first member's place. Such a tensor was made before any of them ran, so
    pruning a group cannot change the inputs of the groups before it, nor its own."""
    groups: list[list[str]] = []
    for name, x in captured.items():
        home = next((g for g in groups if captured[g[0]] is x), None)
        if home is None:
            groups.append([name])
        else:
            home.append(name)
    return groups


@torch.no_grad()
def call_groups(model: nn.Module, layers: list[PrunableLayer], batch: tuple
                ) -> list[list[PrunableLayer]]:
    """`layers` in the order a forward pass on the `(inputs, targets)` batch first calls
    them, grouped by the tensor they are fed (`groups_by_input`); the pass stops once every
    layer has its input. Raises ValueError on a layer the pass never calls."""
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, args):
            captured.setdefault(name, args[0])
            if len(captured) == len(layers):
                raise _StopForward
        return hook

    handles = [layer.module.register_forward_pre_hook(make_hook(layer.name)) for layer in layers]
    try:
        model(batch[0])
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer.name for layer in layers if layer.name not in captured]
    if missing:
        raise ValueError(f"layers never used in the model's forward pass: {missing}")
    by_name = {layer.name: layer for layer in layers}
    return [[by_name[name] for name in group] for group in groups_by_input(captured)]


def input_statistics(
    model: nn.Module, layers: list[PrunableLayer], batches: list, stop_after: bool = False,
    dense: nn.Module | None = None,
) -> dict[str, InputCovariance | list[InputCovariance]]:
    """X X^T / tokens of every layer's inputs over the calibration batches (no gradients);
    a list of them, one per group, for a grouped convolution. With `stop_after`, each
    forward pass stops once every layer has run (the layers must all be called in every
    pass). With `dense` (a copy of the model before pruning, its modules named as the
    model's) each batch is run through it first and the statistics of ungrouped layers are
    paired with its layer inputs (`InputCovariance.cross`)."""
    def grouped(layer: PrunableLayer) -> int:
        return getattr(layer.module, "groups", 1)

    stats = {layer.name: InputCovariance(layer.shape[1], layer.w0.device, groups=grouped(layer),
                                         paired=dense is not None and grouped(layer) == 1)
             for layer in layers}
    dense_inputs: dict[str, list[torch.Tensor]] = {}  # per layer, one per call, in call order

    def run(net: nn.Module, modules: dict[str, nn.Module], inputs: torch.Tensor,
            add: Callable) -> None:
        pending: set[str] = set()

        def hook(name: str):
            def on_call(module, args, out):
                add(name, input_matrix(module, args[0]))
                pending.discard(name)
                if stop_after and not pending:
                    raise _StopForward
            return on_call

        handles = [modules[layer.name].register_forward_hook(hook(layer.name))
                   for layer in layers]
        try:
            pending.update(stats)
            net(inputs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    def add_dense(name: str, x: torch.Tensor) -> None:
        dense_inputs.setdefault(name, []).append(x)

    def add(name: str, x: torch.Tensor) -> None:
        stats[name].add_batch(x, dense_inputs[name].pop(0) if stats[name].paired else None)

    own = {layer.name: layer.module for layer in layers}
    dense_modules = dict(dense.named_modules()) if dense is not None else {}
    with torch.no_grad():
        for inputs, _ in batches:
            if dense is not None:
                run(dense, dense_modules, inputs, add_dense)
            run(model, own, inputs, add)
    return {name: cov.split() if cov.sum.ndim == 3 else cov for name, cov in stats.items()}


def mean_loss(model: nn.Module, batches: list, loss_fn: LossFn) -> float:
    """The calibration loss, a sample-weighted mean over batches."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            total += float(loss_fn(model(inputs), targets)) * len(inputs)
            count += len(inputs)
    return total / count


@dataclass
class LayerSignals:
    """A layer's inputs x (samples, positions, cols) and the per-sample loss gradients of its
    outputs delta (samples, positions, rows): the per-sample weight gradient of entry (r, c) is
    sum over positions of delta[:, :, r] * x[:, :, c]."""

    x: torch.Tensor
    delta: torch.Tensor


def per_sample_signals(
    model: nn.Module, layers: list[PrunableLayer], batches: list, loss_fn: LossFn
) -> tuple[dict[str, LayerSignals], float]:
    """One forward and backward pass over the calibration set capturing every layer's inputs
    and per-sample output gradients; returns them with the mean loss.

    `loss_fn` must average over the samples of a batch (as `F.cross_entropy` does), so that
    scaling it by the batch size makes each sample's gradient its own loss's gradient.
    """
    names = {layer.module: layer.name for layer in layers}
    names_to_module = {layer.name: layer.module for layer in layers}
    xs: dict[str, list] = {layer.name: [] for layer in layers}
    deltas: dict[str, list] = {layer.name: [] for layer in layers}
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def forward_hook(module, args, out):
        calls.append((names[module], input_matrix(module, args[0].detach()), out))

    handles = [layer.module.register_forward_hook(forward_hook) for layer in layers]
    needs_grad = [layer.module.weight.requires_grad for layer in layers]
    total, count = 0.0, 0
    try:
        for layer in layers:
            layer.module.weight.requires_grad_(True)
        with torch.enable_grad():
            for inputs, targets in batches:
                calls.clear()
                loss = loss_fn(model(inputs), targets)
                outs = [out for _, _, out in calls]
                grads = torch.autograd.grad(loss * len(inputs), outs, allow_unused=True)
                # A layer called several times in one forward sees more positions.
                batch_x: dict[str, list] = {name: [] for name in xs}
                batch_d: dict[str, list] = {name: [] for name in xs}
                for (name, x, out), grad in zip(calls, grads, strict=True):
                    grad = torch.zeros_like(out) if grad is None else grad
                    batch_x[name].append(x)
                    batch_d[name].append(output_matrix(names_to_module[name], grad))
                for name in xs:
                    if not batch_x[name]:
                        raise ValueError(f"layer {name} is not used by the model's forward")
                    xs[name].append(torch.cat(batch_x[name], dim=1))
                    deltas[name].append(torch.cat(batch_d[name], dim=1))
                total += float(loss.detach()) * len(inputs)
                count += len(inputs)
    finally:
        for h in handles:
            h.remove()
        for layer, flag in zip(layers, needs_grad, strict=True):
            layer.module.weight.requires_grad_(flag)
    signals = {
        name: LayerSignals(torch.cat(xs[name]), torch.cat(deltas[name])) for name in xs
    }
    return signals, total / count
