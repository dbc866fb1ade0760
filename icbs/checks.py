"""The argument checks both settings types (`icbs.Settings`, `LLMPruneSettings`) make, so a
value is refused with the same words wherever it comes in."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from icbs.masks import Pattern, check_sparsity, parse_pattern


def one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def integer_at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def finite_at_least(name: str, value: Any, minimum: float | None = 0.0) -> None:
    """A finite number, and >= `minimum` unless that is None."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or (
            minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def flag_at_least(flag: str, value: int | None, minimum: int) -> None:
    """A command-line integer flag (None: not given) must be at least `minimum`."""
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def output_directory(flag: str, path: str | Path) -> None:
    """An output path must not be an existing file (a directory, or nothing yet)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag} {path} is an existing file; give a directory")


def pattern_and_sparsity(pattern: str | Pattern, sparsity: float | None,
                         default: float = 0.5) -> tuple[Pattern, float]:
    """The parsed pattern and its sparsity: an N:M pattern prunes 1 - N/M, and another
    sparsity given with it is refused; None means that, or `default`."""
    pattern = parse_pattern(pattern)
    fixed = 1 - pattern.n / pattern.m if pattern.kind == "nm" else None
    sparsity = check_sparsity((fixed or default) if sparsity is None else sparsity)
    if fixed is not None and abs(sparsity - fixed) > 1e-9:
        raise ValueError(f"pattern {pattern} prunes {fixed:g} of the weights, not the "
                         f"sparsity {sparsity:g} given; leave the sparsity out or give "
                         f"{fixed:g}")
    return pattern, sparsity
