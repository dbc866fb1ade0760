"""Layerwise block steps for many rows at once.

For the layerwise objective (kept weights frozen) the rows of a layer are independent
problems whenever the pattern counts per row or per group of a row (`per_output`, N:M): a
step can take one block in each of R rows and solve R QUBOs in one solver call. Each row's
block QUBO is the one `icbs.block_qubo` builds for it (the same model, built for all R rows
in one numba pass over the layer's H, `block_qubos`), and since that model is exact every
improving answer is kept, as on the one-block path. A row's block is chosen as
`icbs.refit_steps.choose_blocks` chooses it: half pruned weights, the ones whose return
would lower the error most, half kept ones, the ones whose pruning would raise it least (each
flip's exact change with the rest of the row held), the best ones first and, after a
rejected step, at random from the best twice as many (for N:M, whole groups ranked by their
best return plus their cheapest pruning).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from icbs.masks import Pattern, group_ids
from icbs.refit_steps import _draw, check_block_choice
from solvers import QUBOStack

ROW_ELEMENTS = 2**20  # entries of one batch's stacked block Hessians (8 MB in float64)


@dataclass
class BatchedResult:
    weight: torch.Tensor  # the kept values (w0 where a weight came back), float32
    mask: torch.Tensor
    steps: int  # one per row and step
    accepted: int
    seconds: float
    passes: float  # row steps / rows: how many times the budget went over every row


@njit(cache=True)
def block_qubos(h, blocks, v, a, g):
    """The block QUBOs of R rows (`icbs.block_qubo`'s model with gamma 1, no ridge): for row
    r with block columns blocks[r], kept values v, a = v - current and gradient g (all
    (R, B) float64; h the (cols, cols) float64 Hessian), dL(x) = scale_r * x^T Q_r x + c_r.
    Returns (Q (R, B, B) scaled to max|Q_r| = 1, c, scale), one pass over each block. Unlike
    the one-block path, relatively tiny entries are not zeroed (the dense solvers gain
    nothing from it)."""
    rows, size = blocks.shape
    q = np.empty((rows, size, size))
    c = np.empty(rows)
    scale = np.empty(rows)
    ha = np.empty(size)
    for r in range(rows):
        idx = blocks[r]
        for i in range(size):
            hi = h[idx[i]]
            total = 0.0
            vi = 0.5 * v[r, i]
            for j in range(size):
                hij = hi[idx[j]]
                total += hij * a[r, j]
                q[r, i, j] = vi * v[r, j] * hij
            ha[i] = total
        cr = 0.0
        for i in range(size):
            q[r, i, i] -= v[r, i] * (ha[i] + g[r, i])
            cr += a[r, i] * (0.5 * ha[i] + g[r, i])
        top = 0.0
        for i in range(size):
            for j in range(size):
                top = max(top, abs(q[r, i, j]))
        top = top if top > 0 else 1.0
        for i in range(size):
            for j in range(size):
                q[r, i, j] /= top
        c[r] = cr
        scale[r] = top
    return q, c, scale


def _blocks(w0: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, h: torch.Tensor,
            gradient: torch.Tensor, groups: torch.Tensor, block_size: int,
            gen: torch.Generator, explore: torch.Tensor | None) -> torch.Tensor:
    """(R, B) columns of each row's next block, sorted: the best candidates, or in the rows
    where `explore` is set (all rows when it is None) a draw from the best twice as many.
    A candidate's rank is the exact change of 0.5 e^T H e (e = weight * keep - w0, gradient
    = e H) when it alone flips: w0 g + 0.5 w0^2 H_jj to return a pruned weight, -w g + 0.5 w^2
    H_jj to prune a kept one."""
    diag = torch.diagonal(h)
    back = torch.where(keep, torch.inf, w0 * gradient + 0.5 * w0**2 * diag)
    prune = torch.where(keep, -weight * gradient + 0.5 * weight**2 * diag, torch.inf)
    group_count = int(groups.max()) + 1
    if group_count > 1:  # N:M: whole groups, ranked by their best return plus cheapest prune
        index = groups.expand_as(back)
        best_back = torch.full((len(keep), group_count), torch.inf, dtype=back.dtype)
        best_back.scatter_reduce_(1, index, back, "amin")
        best_prune = torch.full_like(best_back, torch.inf)
        best_prune.scatter_reduce_(1, index, prune, "amin")
        size = back.shape[1] // group_count
        wanted = max(1, min(group_count, block_size // size))
        chosen = _draw(-(best_back + best_prune), wanted, group_count, 2, gen, explore)
        return (chosen.sort(1).values[:, :, None] * size + torch.arange(size)).flatten(1)
    pruned = _draw(-back, block_size // 2, int((~keep).sum(1).min()), 2, gen, explore)
    kept = _draw(-prune, block_size - pruned.shape[1], int(keep.sum(1).min()), 2, gen,
                 explore)
    return torch.cat([pruned, kept], 1).sort(1).values


def batched_step(w0: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, h: torch.Tensor,
                 blocks: torch.Tensor, groups: torch.Tensor, solver, seeds: list[int],
                 gradient: torch.Tensor | None = None) -> torch.Tensor:
    """One block step in each row: `blocks` (R, B) columns per row, solved from the current
    mask by one `solver.solve_stack`; the improving answers are written into `weight` and
    `keep` (a weight that comes back takes w0). `gradient` is (weight * keep - w0) H when
    the caller has it. Returns the model's change per row (0 where the answer was not kept).
    All float64 but `keep`."""
    rows = torch.arange(len(w0))[:, None]
    kb = keep[rows, blocks]
    wb, w0b = weight[rows, blocks], w0[rows, blocks]
    if gradient is None:
        gradient = (weight * keep - w0) @ h
    g = gradient[rows, blocks]
    v = torch.where(kb, wb, w0b)
    q, c, scale = (torch.as_tensor(t) for t in block_qubos(
        h.numpy(), blocks.numpy(), v.numpy(), (v - wb * kb).numpy(), g.numpy()))
    x_now = (~kb).to(torch.int8)
    local = groups[blocks]  # the blocks' columns are sorted, so a row's groups are runs
    local = torch.cat([torch.zeros_like(local[:, :1]),
                       (local[:, 1:] != local[:, :-1]).long().cumsum(1)], 1)
    counts = torch.zeros(len(local), int(local.max()) + 1, dtype=torch.long).scatter_add_(
        1, local, x_now.long())
    stack = QUBOStack(q.numpy(), counts.numpy(), local.numpy())
    x, energies = solver.solve_stack(stack, x_now.numpy(), seeds)
    x = torch.as_tensor(x).double()
    delta = torch.as_tensor(energies) * scale + c
    changed = (x != torch.as_tensor(x_now)).any(1)
    take = changed & (delta < 0)
    if take.any():
        new_keep = x[take] == 0
        back = new_keep & ~kb[take]
        tb = blocks[take]
        trows = rows[take]
        keep[trows, tb] = new_keep
        weight[trows, tb] = torch.where(back, w0b[take], wb[take])
    return torch.where(take, delta, torch.zeros_like(delta))


def warm_up(solver) -> None:
    """Compile the kernels of a batched step (or load them from numba's cache) on a tiny
    layer, so that it happens here and not inside a timed budget."""
    w0 = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    keep = torch.tensor([[True, False, True, False]])
    batched_step(w0, w0.clone(), keep, torch.eye(4, dtype=torch.float64),
                 torch.arange(4)[None], torch.zeros(4, dtype=torch.long), solver, [0])


def improve_rows_batched(weight0: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, *,
                         weight: torch.Tensor, pattern: Pattern, block_size: int, solver,
                         seed: int, seconds: float | None = None, steps: int | None = None,
                         order: torch.Tensor | None = None, block_choice: str = "best_first"
                         ) -> BatchedResult:
    """Layerwise block steps on every row of a layer (`per_output` or N:M), in batches of
    rows that step together, cycling over the batches (rows in `order`, e.g. worst first)
    until `seconds` or `steps` (row steps) are spent. `hessian` is the steps' H (any ridge
    included). `block_choice` "best_first" takes a row's best candidates and draws at random
    only after its last step was rejected; "random" always draws."""
    if pattern.kind == "unstructured":
        raise ValueError("batched steps need a per-row count (per_output or N:M); "
                         "unstructured has one count per layer")
    check_block_choice(block_choice)
    rows, cols = weight0.shape
    h = hessian.double().cpu()
    w0 = weight0.double().cpu()
    current = weight.double().cpu().clone()
    keep = mask.cpu().clone()
    rejected = torch.zeros(rows, dtype=torch.bool)  # the row's last step found nothing
    groups = group_ids((1, cols), pattern)[0]
    order = torch.arange(rows) if order is None else order.cpu()
    size = max(1, ROW_ELEMENTS // block_size**2)
    batches = [order[i:i + size] for i in range(0, rows, size)]
    gen = torch.Generator().manual_seed(seed)
    begin = time.perf_counter()
    taken = accepted = 0
    turn = 0
    while (steps is None or taken < steps) and \
            (seconds is None or time.perf_counter() - begin < seconds):
        ids = batches[turn % len(batches)]
        turn += 1
        if steps is not None:
            ids = ids[:steps - taken]
        w, k, w0_rows = current[ids], keep[ids], w0[ids]
        gradient = (w * k - w0_rows) @ h
        explore = rejected[ids] if block_choice == "best_first" else None
        blocks = _blocks(w0_rows, w, k, h, gradient, groups, block_size, gen, explore)
        seeds = torch.randint(2**31, (len(ids),), generator=gen).tolist()
        delta = batched_step(w0_rows, w, k, h, blocks, groups, solver, seeds, gradient)
        current[ids], keep[ids] = w, k
        rejected[ids] = delta >= 0
        taken += len(ids)
        accepted += int((delta < 0).sum())
    device = weight0.device
    return BatchedResult(weight=current.float().to(device), mask=keep.to(device), steps=taken,
                         accepted=accepted, seconds=time.perf_counter() - begin,
                         passes=taken / rows)
