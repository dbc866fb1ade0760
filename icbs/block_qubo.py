"""Turn "which weights of this block to prune" into a cardinality-constrained QUBO.

For a block B with current weights w_B, kept values v_B (w where kept, the dense w0 where
pruned), gradient g_B and Hessian H_BB of the objective, pruning x (x_i = 1: pruned) changes
the weights by D(x) = a - x * v with a = v_B - w_B, and the quadratic model of the change is

    dL(x) = gamma * g.D + 1/2 D^T H D + ridge * |D|^2  =  x^T Q x + c.

The current mask has dL = 0, so an answer with dL < 0 is an improvement of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from solvers import CardinalityQUBO


@dataclass
class BlockQUBO:
    """The exact quadratic model (`Q`, `c`) and the scaled, sparsified problem for the solver."""

    Q: np.ndarray
    c: float
    problem: CardinalityQUBO
    x_current: np.ndarray

    def delta(self, x: np.ndarray) -> float:
        """The model's change of the objective for state x (0 for the current state)."""
        x = x.astype(np.float64)
        return float(x @ self.Q @ x + self.c)


def quadratic_model(
    v: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor,
    H: torch.Tensor,
    gamma: float = 1.0,
    ridge: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Q (float64) and c of dL(x) = x^T Q x + c for one block; H must be symmetric, and
    then Q is exactly symmetric. H is not modified."""
    H, v, a, g = (t.double() for t in (H, v, a, g))
    if ridge:
        H = H + 2.0 * ridge * torch.eye(len(v), dtype=H.dtype, device=H.device)
    Q = torch.outer(v, v).mul_(0.5).mul_(H)
    Q.diagonal().sub_(v * (H @ a) + gamma * v * g)
    c = 0.5 * a @ H @ a + gamma * g @ a
    return Q.cpu().numpy(), float(c)


def build_block_qubo(
    v: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor,
    H: torch.Tensor,
    x_current: torch.Tensor,
    groups: torch.Tensor,
    *,
    gamma: float = 1.0,
    ridge: float = 0.0,
    eps: float = 1e-12,
) -> BlockQUBO:
    """The block's QUBO with one cardinality group per pattern group present in the block.

    `groups` holds the pattern's group id of each block variable; each group keeps the number
    it prunes now, so every feasible answer keeps the layer's sparsity pattern. The solver
    gets Q divided by max|Q| with entries |Q| <= eps (relative) set to zero.
    """
    Q, c = quadratic_model(v, a, g, H, gamma, ridge)
    x_now = x_current.cpu().numpy().astype(np.int8)
    _, local_groups = np.unique(groups.cpu().numpy(), return_inverse=True)
    k = np.bincount(local_groups, weights=x_now).astype(np.int64)
    scale = float(np.abs(Q).max())
    scaled = Q / scale if scale > 0 else Q.copy()
    scaled[np.abs(scaled) <= eps] = 0.0
    problem = CardinalityQUBO(scaled, k, groups=local_groups, copy=False, symmetric=True)
    return BlockQUBO(Q=Q, c=c, problem=problem, x_current=x_now)
