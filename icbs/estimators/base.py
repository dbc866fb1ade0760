"""What an estimator is (`Estimator`), what it is built from (`EstimatorContext`), and the
registry behind `Settings(objective=...)`: a new estimator is one module with a class that
has `from_context` and is decorated with `register_estimator("name")`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from icbs.calibration import LossFn, input_statistics
from icbs.layer_stats import InputCovariance
from icbs.layers import PrunableLayer


class Estimator(Protocol):
    """A block's gradient g_B and Hessian H_BB of the objective, and the objective itself."""

    def block(self, layer: PrunableLayer, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, H) for the flat weight indices `idx`, float64, H exactly symmetric (callers
        must not modify it)."""

    def objective(self, layers: list[PrunableLayer]) -> float:
        """The value the estimates model, at the current masks."""

    def changed(self) -> None:
        """The masks or weights changed: drop what was cached for the old ones."""


@dataclass
class EstimatorContext:
    """What an estimator may be built from; input statistics are gathered on first use."""

    model: nn.Module
    layers: list[PrunableLayer]
    batches: list
    loss_fn: LossFn
    _statistics: dict[str, InputCovariance] | None = field(default=None, repr=False)

    def input_statistics(self) -> dict[str, InputCovariance]:
        """X X^T / tokens of every layer's inputs (one pass over the calibration batches)."""
        if self._statistics is None:
            self._statistics = input_statistics(self.model, self.layers, self.batches)
        return self._statistics


_REGISTRY: dict[str, Callable[[EstimatorContext], Estimator]] = {}


def register_estimator(name: str):
    """Class decorator: make `cls.from_context` available as the objective `name`."""

    def wrap(cls):
        _REGISTRY[name] = cls.from_context
        return cls

    return wrap


def available_estimators() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_estimator(name: str, context: EstimatorContext) -> Estimator:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; expected one of {available_estimators()}")
    return _REGISTRY[name](context)
