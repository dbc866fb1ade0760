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

from solvers import CardinalityQUBO, QUBOStack


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
) -> tuple[np.ndarray, float | np.ndarray]:
    """Q (float64) and c of dL(x) = x^T Q x + c for one block, or for a stack of blocks when
    the arguments have a leading batch dimension ((R, n) vectors, (R, n, n) H: Q (R, n, n),
    c (R,)); H must be symmetric, and then Q is exactly symmetric. H is not modified."""
    H, v, a, g = (t.double() for t in (H, v, a, g))
    if ridge:
        H = H + 2.0 * ridge * torch.eye(v.shape[-1], dtype=H.dtype, device=H.device)
    ha = (H @ a[..., None])[..., 0]
    Q = (v[..., :, None] * v[..., None, :]).mul_(0.5).mul_(H)
    Q.diagonal(dim1=-2, dim2=-1).sub_(v * ha + gamma * v * g)
    c = 0.5 * (a * ha).sum(-1) + gamma * (g * a).sum(-1)
    return Q.cpu().numpy(), float(c) if c.dim() == 0 else c.cpu().numpy()


def _solver_matrices(Q: np.ndarray, eps: float) -> np.ndarray:
    """Q divided by its max|Q| (each matrix of a stack), entries |.| <= eps then zeroed."""
    scale = np.abs(Q).max(axis=(-2, -1), keepdims=True)
    scaled = Q / np.where(scale > 0, scale, 1.0)
    scaled[np.abs(scaled) <= eps] = 0.0
    return scaled


def _local_groups(groups: np.ndarray) -> np.ndarray:
    """(R, n) pattern group ids -> 0..G-1 in each row, numbered in order of the ids."""
    order = np.argsort(groups, axis=1, kind="stable")
    ordered = np.take_along_axis(groups, order, 1)
    rank = np.concatenate([np.zeros((len(groups), 1), np.int64),
                           np.cumsum(ordered[:, 1:] != ordered[:, :-1], 1)], 1)
    local = np.empty_like(rank)
    np.put_along_axis(local, order, rank, 1)
    return local


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
    local_groups = _local_groups(groups.cpu().numpy()[None])[0]
    k = np.bincount(local_groups, weights=x_now).astype(np.int64)
    problem = CardinalityQUBO(_solver_matrices(Q, eps), k, groups=local_groups, copy=False,
                              symmetric=True)
    return BlockQUBO(Q=Q, c=c, problem=problem, x_current=x_now)


def build_block_qubos(
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
) -> QUBOStack:
    """The solver problems of R blocks at once, problem r the one `build_block_qubo` makes
    from row r of each argument ((R, n) vectors and states, (R, n, n) H, exactly symmetric);
    every row's block must hold equally many pattern groups."""
    Q, _ = quadratic_model(v, a, g, H, gamma, ridge)
    local_groups = _local_groups(groups.cpu().numpy())
    x_now = x_current.cpu().numpy().astype(np.int64)
    count = int(local_groups.max()) + 1 if local_groups.size else 1
    k = np.stack([(x_now * (local_groups == group)).sum(1) for group in range(count)], 1)
    return QUBOStack(_solver_matrices(Q, eps), k, local_groups)
