"""Sparsity patterns and masks.

A mask is a boolean tensor shaped like the layer's weight matrix, True where the weight is
kept. A pattern says which sets of weights ("groups") must each lose an exact number:
`unstructured` (the whole layer is one group), `per_output` (one group per output row, Wanda's
LLM default) and `N:M` (N weights kept in every run of M inputs of a row, e.g. "2:4").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: `kind` is "unstructured", "per_output" or "nm" (with `n` kept of `m`)."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


PATTERN_HELP = 'one of "unstructured", "per_output", or "N:M" such as "2:4" or "4:8"'


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Parse a pattern name; N:M means N weights kept out of every M consecutive inputs."""
    if isinstance(pattern, Pattern):
        return pattern
    if pattern in ("unstructured", "per_output"):
        return Pattern(pattern)
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if match:
        n, m = int(match[1]), int(match[2])
        if 0 < n < m:
            return Pattern("nm", n, m)
    raise ValueError(f"unknown sparsity pattern {pattern!r}; expected {PATTERN_HELP}")


def parse_setting(text: str) -> tuple[str, float]:
    """An experiment's setting as (canonical pattern, sparsity): "per_output@0.5" ->
    ("per_output", 0.5); "2:4" -> ("2:4", 0.5)."""
    name, _, sparsity = text.partition("@")
    pattern = parse_pattern(name)
    if pattern.kind == "nm":
        return str(pattern), 1 - pattern.n / pattern.m
    if not sparsity:
        raise ValueError(f"setting {text!r} needs a sparsity, e.g. {name}@0.5")
    return str(pattern), float(sparsity)


def check_shape(shape: tuple[int, int], pattern: Pattern, name: str = "layer") -> None:
    """Raise if the pattern cannot be applied to a weight matrix of this shape."""
    if pattern.kind == "nm" and shape[1] % pattern.m:
        raise ValueError(
            f"{name}: input width {shape[1]} is not a multiple of M={pattern.m} for pattern "
            f"{pattern}; exclude this layer or choose another pattern"
        )


def group_ids(shape: tuple[int, int], pattern: Pattern) -> torch.Tensor:
    """Group index of every weight of a (rows, cols) matrix, shaped like it (int64)."""
    rows, cols = shape
    check_shape(shape, pattern)
    r = torch.arange(rows).unsqueeze(1).expand(rows, cols)
    c = torch.arange(cols).unsqueeze(0).expand(rows, cols)
    if pattern.kind == "unstructured":
        return torch.zeros(shape, dtype=torch.int64)
    if pattern.kind == "per_output":
        return r.clone()
    return r * (cols // pattern.m) + c // pattern.m


def pruned_per_group(shape: tuple[int, int], pattern: Pattern, sparsity: float) -> int:
    """How many weights each group of the pattern loses at this sparsity."""
    rows, cols = shape
    if pattern.kind == "unstructured":
        return int(round(sparsity * rows * cols))
    if pattern.kind == "per_output":
        return int(round(sparsity * cols))
    return pattern.m - pattern.n


def check_layer(name: str, weight: torch.Tensor, pattern: Pattern | None = None,
                sparsity: float | None = None) -> None:
    """Raise unless the (rows, cols) weight is finite, fits the pattern (when given) and keeps
    some weights of every group at the sparsity (when given). A weight on the meta device (a
    model held one block at a time) is checked for its shape only."""
    if not weight.is_meta and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}: the weights have NaN or Inf entries")
    shape = (weight.shape[0], weight[0].numel())
    if pattern is not None:
        check_shape(shape, pattern, name)
        if sparsity is not None:
            check_counts(shape, pattern, sparsity, name)


def check_counts(shape: tuple[int, int], pattern: Pattern, sparsity: float,
                 name: str = "layer") -> None:
    """Raise if the sparsity rounds to pruning every weight of the pattern's groups."""
    size = shape[0] * shape[1] if pattern.kind == "unstructured" else \
        shape[1] if pattern.kind == "per_output" else pattern.m
    if pruned_per_group(shape, pattern, sparsity) >= size:
        raise ValueError(f"{name}: sparsity {sparsity} with pattern {pattern} prunes all {size} "
                         f"weights of every group (whole rows); use a lower sparsity")


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a fraction strictly between 0 and 1, got {sparsity!r}")
    return float(sparsity)


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: str | Pattern) -> torch.Tensor:
    """Keep-mask that prunes the lowest-scoring weights, exactly `pruned_per_group` per group.

    Ties are broken by position (the earlier weight is pruned first), never by a threshold
    test, so quantized weights with many equal values still hit the count exactly. For N:M
    the `sparsity` argument is ignored: the pattern fixes it at 1 - N/M.
    """
    pattern = parse_pattern(pattern)
    rows, cols = scores.shape
    check_shape((rows, cols), pattern)
    k = pruned_per_group((rows, cols), pattern, sparsity)
    if pattern.kind == "unstructured":
        grouped = scores.reshape(1, -1)
    elif pattern.kind == "per_output":
        grouped = scores
    else:
        grouped = scores.reshape(-1, pattern.m)
    if k == 0:
        return torch.ones((rows, cols), dtype=torch.bool, device=scores.device)
    grouped = grouped.float()
    grouped = torch.where(torch.isnan(grouped), float("inf"), grouped)  # NaN: never pruned first
    # The k-th lowest score of each group is the threshold; of the scores equal to it, the
    # earliest are pruned. Same mask as a stable sort, in linear time.
    threshold = torch.kthvalue(grouped, k, dim=1, keepdim=True).values
    below = grouped < threshold
    tied = grouped == threshold
    room = k - below.sum(1, keepdim=True)
    return ~(below | (tied & (tied.cumsum(1) <= room))).reshape(rows, cols)


def mask_matches_pattern(mask: torch.Tensor, pattern: Pattern, sparsity: float) -> bool:
    """True when every group of the pattern has exactly its required number pruned."""
    groups = group_ids(tuple(mask.shape), pattern).flatten()
    pruned = torch.bincount(groups, weights=(~mask).flatten().double())
    return bool(np.all(pruned.numpy() == pruned_per_group(tuple(mask.shape), pattern, sparsity)))
