"""One thread count for torch's CPU kernels and for the solvers' numba kernels."""

from __future__ import annotations

import numba
import torch


def set_threads(count: int) -> None:
    """Use `count` CPU threads in torch and in numba's parallel kernels (a stack of block
    QUBOs is solved problem by problem in parallel), capped at numba's pool size."""
    torch.set_num_threads(count)
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
