"""Prunable layers of a model: which ones, their weights as matrices, their masks."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from icbs.masks import Pattern, check_layer

PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


@dataclass
class PrunableLayer:
    """One layer's dense weights `w0` and keep-`mask`, both as (rows, cols) matrices.

    A Conv2d of shape (out, in, kh, kw) is the matrix out x (in*kh*kw). `weight` is the
    current value of the kept weights: `w0` unless a reconstruction step updated them.
    """

    name: str
    module: nn.Module
    w0: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w0.shape)

    @property
    def numel(self) -> int:
        return self.w0.numel()

    def pruned_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def apply(self) -> None:
        """Write the pruned weights into the module."""
        with torch.no_grad():
            self.module.weight.copy_(self.pruned_weight().reshape(self.module.weight.shape))

    def restore_dense(self) -> None:
        with torch.no_grad():
            self.module.weight.copy_(self.w0.reshape(self.module.weight.shape))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_prunable(
    model: nn.Module,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    pattern: Pattern | None = None,
    sparsity: float | None = None,
    grouped: bool = False,
) -> list[PrunableLayer]:
    """Linear and Conv2d layers of `model` whose names match `include` (all when empty) and
    none of `exclude` (shell-style wildcards). Raises when none is left or a weight is not
    finite, when the pattern does not fit a layer's shape, or when the sparsity would prune
    whole groups of it (`check_layer`). Grouped convolutions are refused unless `grouped`."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if include and not _matches(name, include) or _matches(name, exclude):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1 and not grouped:
            raise ValueError(f"{name}: grouped convolutions (groups={module.groups}) are not "
                             "supported here; exclude this layer, or prune layer by layer "
                             "(icbs.prune_layer_by_layer)")
        w0 = module.weight.detach().reshape(module.weight.shape[0], -1).clone()
        check_layer(name, w0, pattern, sparsity)
        mask = torch.ones_like(w0, dtype=torch.bool)
        layers.append(PrunableLayer(name, module, w0, mask, w0))
    if not layers:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_TYPES)
        raise ValueError(f"no prunable layers ({kinds}) match include={list(include)} "
                         f"exclude={list(exclude)}")
    return layers


def input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as (samples, positions, cols), cols matching the weight matrix (for a
    grouped convolution, those of every group one after the other)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def output_matrix(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer output (or its gradient) as (samples, positions, rows)."""
    if isinstance(module, nn.Conv2d):
        return y.flatten(2).transpose(1, 2)
    return y.reshape(y.shape[0], -1, y.shape[-1])
