"""One block step on one layer: choose a block, estimate, build the block QUBO, solve from the
current mask, apply the answer when it lowers the model. `block_step` is the step both
drivers take (`Pruner` over a model, `improve_layer` on one layer)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from icbs.block_qubo import build_block_qubo
from icbs.layers import PrunableLayer
from solvers import Solver


@dataclass
class BlockAnswer:
    """The solver's answer for a block: `x` (1 = pruned), the current state, the model's
    change of the objective `delta`, and where the time went."""

    idx: torch.Tensor
    x: np.ndarray
    x_current: np.ndarray
    delta: float
    estimate_time: float
    solver_time: float
    solver_info: dict

    @property
    def changed(self) -> np.ndarray:
        return np.flatnonzero(self.x != self.x_current)

    @property
    def improves(self) -> bool:
        return self.delta < 0 and len(self.changed) > 0


def solve_block(
    layer: PrunableLayer,
    idx: torch.Tensor,
    groups: torch.Tensor,
    estimator,
    solver: Solver,
    *,
    gamma: float = 1.0,
    ridge: float = 0.0,
    eps: float = 1e-12,
    seed: int | None = None,
) -> BlockAnswer:
    """Solve "which of the weights `idx` of `layer` to prune" keeping each group's count.

    A weight that comes back takes its dense value w0; a kept one keeps its current value.
    """
    t0 = time.perf_counter()
    g, H = estimator.block(layer, idx)
    keep = layer.mask.flatten()[idx]
    current = layer.weight.flatten()[idx]
    v = torch.where(keep, current, layer.w0.flatten()[idx])
    a = v - current * keep
    qubo = build_block_qubo(v, a, g, H, ~keep, groups[idx], gamma=gamma, ridge=ridge, eps=eps)
    estimate_time = time.perf_counter() - t0
    result = solver.solve(qubo.problem, x0=qubo.x_current, seed=seed)
    return BlockAnswer(idx, result.x, qubo.x_current, qubo.delta(result.x), estimate_time,
                       result.info["wall_time"], result.info)


def capped_block_size(block_size: int, solver: Solver) -> int:
    """The block size, at most what the solver accepts (e.g. what a dimod sampler declares)."""
    if solver.max_variables is not None:
        return min(block_size, solver.max_variables)
    return block_size


def block_step(
    layer: PrunableLayer,
    index: int,
    selector,
    groups: torch.Tensor,
    estimator,
    solver: Solver,
    rng: np.random.Generator,
    apply: Callable[[BlockAnswer], bool],
    *,
    gamma: float = 1.0,
    ridge: float = 0.0,
    eps: float = 1e-12,
) -> tuple[np.ndarray, BlockAnswer | None, bool]:
    """Choose a block of layer `index` (the selector's), solve it from the current mask and,
    when the model's change is negative, hand the answer to `apply`, which writes it and
    returns whether it stays; the selector learns what changed. Returns (the block, the
    answer or None for a block of fewer than two weights, accepted)."""
    block = selector.choose_block(index, rng)
    seed = int(rng.integers(2**31))
    if len(block) < 2:
        return block, None, False
    idx = torch.as_tensor(block, device=layer.w0.device)
    answer = solve_block(layer, idx, groups, estimator, solver, gamma=gamma, ridge=ridge,
                         eps=eps, seed=seed)
    accepted = answer.improves and apply(answer)
    if accepted:
        selector.mark_changed(index, block[answer.changed])
    return block, answer, accepted


def set_block_mask(layer: PrunableLayer, answer: BlockAnswer) -> None:
    """Write the answer into the layer's mask (not into the module); a weight that comes back
    takes its dense value w0, as the block's model assumed."""
    keep = torch.as_tensor(answer.x == 0, device=answer.idx.device)
    back = answer.idx[keep & ~layer.mask.view(-1)[answer.idx]]
    layer.mask.view(-1)[answer.idx] = keep
    layer.weight.view(-1)[back] = layer.w0.view(-1)[back]
