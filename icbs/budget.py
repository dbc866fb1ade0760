"""The budget of the block-coordinate-descent loop: seconds, steps or passes, first one wins."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """Stop at `seconds` of wall time, after `steps` steps, or after `passes` passes (a pass is
    as many steps as it takes blocks of the chosen size to cover every prunable weight once),
    whichever comes first. At least one limit must be set."""

    seconds: float | None = None
    steps: int | None = None
    passes: float | None = None

    def __post_init__(self):
        if self.seconds is None and self.steps is None and self.passes is None:
            raise ValueError("a Budget needs at least one of seconds, steps, passes")
        for name in ("seconds", "steps", "passes"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"Budget.{name} must be >= 0, got {value!r}")

    def max_steps(self, prunable_weights: int, block_size: int) -> int | None:
        limits = [self.steps] if self.steps is not None else []
        if self.passes is not None:
            limits.append(math.ceil(self.passes * prunable_weights / block_size))
        return min(limits) if limits else None
