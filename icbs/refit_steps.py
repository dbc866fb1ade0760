"""Block steps that count the refit: a row's mask improved block by block, each block's mask
chosen for the error the row has after its kept weights are refit.

For one output row with dense weights w0, Hessian H (X X^T / tokens plus a ridge) and kept
set K, the refit weights minimize e = (w - w0)^T H (w - w0) with w = 0 off K; the row's state
is K, the inverse of H_KK and those weights. A block B of the row's columns is scored on the
free set F = K + (B's pruned weights): with M = (H_FF)^-1 (from H_KK^-1 by one bordering
update) and y the weights that are optimal with all of F free (error e_F), pruning the set
P of B (all other weights of F refit) gives exactly (OBS on F)

    e(P) = e_F + y_P^T [(M_PP)^-1] y_P.

That is not quadratic in P. The solver gets the QUBO with the block's effective Hessian
S = (M_BB)^-1 (the Schur complement that eliminates the row's other kept weights):

    E(x) = e_F + (x * y)^T S (x * y),      x_i = 1: weight i of B pruned,

which is e(P) with the block's kept weights held at y instead of refit too, so E(x) >= e(P)
for every x (S_PP - (M_PP)^-1 is positive semidefinite). The answer is then scored exactly
by e(P) and kept only if that is below the row's current error: every accepted step lowers
the true post-refit error, and the row's weights are moved to the refit for the new mask by
the OBS update on F (a rank-|P| downdate of M).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from icbs.block_qubo import build_block_qubo
from icbs.masks import Pattern, group_ids
from icbs.reconstruct import least_squares_update, reconstruction_error

REFRESH_EVERY = 64  # accepted steps between fresh inverses (bounds the update's rounding drift)


class RowRefit:
    """One row's kept set, the inverse of H on it and the refit weights, all float64."""

    def __init__(self, hessian: torch.Tensor, w0: torch.Tensor, keep: torch.Tensor):
        self.h = hessian
        self.w0 = w0
        self.reset(keep.nonzero().squeeze(1))

    def reset(self, kept: torch.Tensor) -> None:
        """Refit from scratch on `kept`: a fresh inverse and the least-squares weights."""
        self.kept = kept
        chol, info = torch.linalg.cholesky_ex(self.h[kept[:, None], kept])
        if int(info):
            raise torch.linalg.LinAlgError(
                "H restricted to a row's kept weights is singular; use a positive ridge "
                "(damp > 0)")
        self.inv = torch.cholesky_inverse(chol)
        self.weight = torch.zeros_like(self.w0)
        self.weight[kept] = self.inv @ (self.h[kept] @ self.w0)
        d = self.weight - self.w0
        self.error = float(d @ self.h @ d)
        self.updates = 0
        self._gradient = None

    @property
    def keep(self) -> torch.Tensor:
        keep = torch.zeros(len(self.w0), dtype=torch.bool, device=self.w0.device)
        keep[self.kept] = True
        return keep

    def gradient(self) -> torch.Tensor:
        """H (w - w0): half the error's gradient; zero on the kept set at the refit."""
        if self._gradient is None:
            self._gradient = self.h @ (self.weight - self.w0)
        return self._gradient

    def prune_costs(self) -> torch.Tensor:
        """Exact error increase of pruning each kept weight alone (OBS: w_i^2 / [H_KK^-1]_ii)."""
        return self.weight[self.kept] ** 2 / torch.diagonal(self.inv)

    def free_block(self, block: torch.Tensor) -> FreeBlock:
        """The block's problem on F = K + its pruned weights (see the module docstring)."""
        in_k = torch.full((len(self.w0),), -1, dtype=torch.long, device=self.w0.device)
        in_k[self.kept] = torch.arange(len(self.kept), device=self.w0.device)
        pos = in_k[block]
        added, kept_pos = block[pos < 0], pos[pos >= 0]
        ac = self.inv @ self.h[self.kept[:, None], added]  # H_KK^-1 H_KU
        schur_inv = torch.linalg.inv(self.h[added[:, None], added] - self.h[added][:, self.kept]
                                     @ ac)
        g = self.gradient()[added]
        # Newton step from the refit on K to the refit on F (the gradient is zero on K).
        step_added = -schur_inv @ g
        y = self.weight.clone()
        y[added] = step_added  # pruned weights are 0 now
        y[self.kept] -= ac @ step_added
        # M_BB of M = (H_FF)^-1 by the bordering formula, the block ordered as (kept, added).
        ac_b = ac[kept_pos]
        m_kb_u = -ac_b @ schur_inv
        m_bb = torch.cat([torch.cat([self.inv[kept_pos[:, None], kept_pos] - m_kb_u @ ac_b.T,
                                     m_kb_u], 1),
                          torch.cat([m_kb_u.T, schur_inv], 1)])
        order = torch.cat([(pos >= 0).nonzero().squeeze(1), (pos < 0).nonzero().squeeze(1)])
        return FreeBlock(block=block[order], added=added, ac=ac, schur_inv=schur_inv, y=y,
                         m_bb=m_bb, error=self.error - float(g @ schur_inv @ g))

    def apply(self, fb: FreeBlock, pruned: torch.Tensor, error: float) -> None:
        """Move to the refit with the block positions `pruned` pruned (its exact `error`), by
        the OBS update on F: M_SS - M_SP M_PP^-1 M_PS for the new kept set S = F - P."""
        k = len(self.kept)
        m = torch.empty(k + len(fb.added), k + len(fb.added), dtype=self.h.dtype,
                        device=self.h.device)
        m[:k, k:] = -fb.ac @ fb.schur_inv
        m[k:, :k] = m[:k, k:].T
        m[:k, :k] = self.inv - m[:k, k:] @ fb.ac.T
        m[k:, k:] = fb.schur_inv
        free = torch.cat([self.kept, fb.added])
        in_f = torch.full((len(self.w0),), -1, dtype=torch.long, device=self.w0.device)
        in_f[free] = torch.arange(len(free), device=free.device)
        p = in_f[fb.block[pruned]]
        self.updates += 1
        if len(p) == 0:  # every weight of the block kept: the refit on F
            self.kept, self.inv, self.weight, self.error = free, m, fb.y, error
            self._gradient = None
            return
        stay = torch.ones(len(free), dtype=torch.bool, device=p.device)
        stay[p] = False
        m_sp = m[stay][:, p]
        solve = torch.linalg.solve(m[p[:, None], p], torch.cat(
            [fb.y[free[p]].unsqueeze(1), m_sp.T], 1))
        kept = free[stay]
        if self.updates % REFRESH_EVERY == 0:
            self.reset(kept)
            return
        inv = m[stay][:, stay] - m_sp @ solve[:, 1:]
        self.inv = (inv + inv.T) / 2
        self.weight = torch.zeros_like(self.weight)
        self.weight[kept] = fb.y[kept] - m_sp @ solve[:, 0]
        self.kept, self.error, self._gradient = kept, error, None


@dataclass
class FreeBlock:
    """One block's problem on the free set F = K + U (U: the block's pruned weights)."""

    block: torch.Tensor  # the block's columns, its kept ones first, then U
    added: torch.Tensor  # U
    ac: torch.Tensor  # H_KK^-1 H_KU
    schur_inv: torch.Tensor  # (H_UU - H_UK H_KK^-1 H_KU)^-1
    y: torch.Tensor  # the row's weights refit on F
    m_bb: torch.Tensor  # (H_FF)^-1 on the block, in `block`'s order
    error: float  # e_F

    def exact_error(self, pruned: torch.Tensor) -> float:
        """e(P) for P = the block positions `pruned` (the rest of F refit)."""
        if len(pruned) == 0:
            return self.error
        yp = self.y[self.block[pruned]]
        return self.error + float(yp @ torch.linalg.solve(self.m_bb[pruned[:, None], pruned],
                                                          yp))

    def effective_hessian(self) -> torch.Tensor:
        """S = (M_BB)^-1: the block's Hessian with the row's other kept weights eliminated."""
        return torch.linalg.inv(self.m_bb)


def choose_row_block(row: RowRefit, groups: torch.Tensor, block_size: int,
                     rng: np.random.Generator, pool_factor: int = 2) -> torch.Tensor:
    """Columns of one row for a block: the kept weights cheapest to prune and the pruned ones
    whose return would lower the error most (gradient^2 / H_jj), drawn at random from the
    best `pool_factor` times as many as are needed. For N:M the block is whole groups."""
    cols = len(row.w0)
    keep = row.keep
    gain = torch.zeros(cols, dtype=row.w0.dtype, device=row.w0.device)
    gain[~keep] = (row.gradient()[~keep] ** 2 / torch.diagonal(row.h)[~keep]).abs()
    cost = torch.full((cols,), float("inf"), dtype=row.w0.dtype, device=row.w0.device)
    cost[row.kept] = row.prune_costs()
    group_count = int(groups.max()) + 1
    if group_count > 1:  # N:M: rank groups by their best swap, take whole groups
        best_gain = torch.zeros(group_count, dtype=gain.dtype, device=gain.device)
        best_gain.scatter_reduce_(0, groups, gain, "amax")
        best_cost = torch.full_like(best_gain, float("inf"))
        best_cost.scatter_reduce_(0, groups, cost, "amin")
        size = cols // group_count
        wanted = max(1, min(group_count, block_size // size))
        chosen = _draw(torch.arange(group_count, device=gain.device), best_gain / best_cost,
                       wanted, pool_factor, rng)
        return (chosen.unsqueeze(1) * size + torch.arange(size, device=chosen.device)).flatten()
    pruned_cols = (~keep).nonzero().squeeze(1)
    pruned = _draw(pruned_cols, gain[pruned_cols], block_size // 2, pool_factor, rng)
    kept = _draw(row.kept, -cost[row.kept], block_size - len(pruned), pool_factor, rng)
    return torch.cat([pruned, kept])


def _draw(candidates: torch.Tensor, score: torch.Tensor, count: int, pool_factor: int,
          rng: np.random.Generator) -> torch.Tensor:
    """`count` (at most all) of `candidates`, at random from the best pool_factor x count."""
    count = min(count, len(candidates))
    pool = candidates[torch.argsort(score, descending=True, stable=True)[:pool_factor * count]]
    pick = rng.choice(len(pool), size=count, replace=False)
    return pool[torch.as_tensor(np.sort(pick), device=pool.device)]


def refit_step(rows: Sequence[RowRefit], blocks: Sequence[torch.Tensor],
               groups: Sequence[torch.Tensor], solver, seed: int) -> tuple[bool, float]:
    """One block step on one or more rows, their blocks solved as one QUBO: `groups` holds
    each row's group id of every column, and equal ids of two rows share one count (the
    unstructured pattern's single group lets sparsity move between the rows). Returns
    (accepted, the exact change of the rows' summed post-refit error of the answer)."""
    fbs = [row.free_block(block) for row, block in zip(rows, blocks, strict=True)]
    y = torch.cat([fb.y[fb.block] for fb in fbs])
    zero = torch.zeros_like(y)
    hessian = torch.block_diag(*[fb.effective_hessian() for fb in fbs])
    x_now = torch.cat([~row.keep[fb.block] for row, fb in zip(rows, fbs, strict=True)])
    block_groups = torch.cat([g[fb.block] for g, fb in zip(groups, fbs, strict=True)])
    # E(x) - e_F as the block QUBO's model: v = y, no gradient (F's refit is stationary).
    qubo = build_block_qubo(y, zero, zero, 2.0 * hessian, x_now, block_groups)
    result = solver.solve(qubo.problem, x0=qubo.x_current, seed=seed)
    if np.array_equal(result.x, qubo.x_current):
        return False, 0.0
    cuts = np.cumsum([len(fb.block) for fb in fbs])[:-1]
    answers = np.split(result.x, cuts)
    pruned = [torch.as_tensor(np.flatnonzero(x), device=y.device) for x in answers]
    errors = [fb.exact_error(p) for fb, p in zip(fbs, pruned, strict=True)]
    before = sum(row.error for row in rows)
    change = sum(errors) - before
    if change >= -1e-12 * max(before, 1e-300):
        return False, change
    for row, fb, p, error, x, now in zip(rows, fbs, pruned, errors, answers,
                                         np.split(qubo.x_current, cuts), strict=True):
        if not np.array_equal(x, now):
            row.apply(fb, p, error)
    return True, change


@dataclass
class RefitResult:
    weight: torch.Tensor  # float32, zero where pruned
    mask: torch.Tensor
    steps: int
    accepted: int
    rows_visited: int
    rows_settled: int  # rows left after `patience` rejected steps in a row: nothing found
    late_acceptance: float  # accepted / steps over each visited row's last `patience` steps
    seconds: float  # the block steps with the rows' set-up: what the budget limits


def improve_rows(weight0: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, *,
                 start: torch.Tensor, pattern: Pattern, block_size: int, solver, seed: int,
                 ridge: float, seconds: float | None = None, steps: int | None = None,
                 patience: int = 16, min_steps: int = 4) -> RefitResult:
    """Refit-aware block steps on every row of a layer, the worst rows (by the error of
    `start`, the current weights) first, each given an equal share of what is left of the
    budget but at least `min_steps` steps (so a small time budget reaches fewer rows rather
    than spending itself on the rows' set-up), and left early after `patience` rejected
    steps in a row. For `unstructured` the
    rows go in pairs, the worst with the best, sharing one count, so that sparsity moves
    to where it costs least. The error is (w - w0)^T (H + ridge * mean(diag H) I) (w - w0);
    rows the budget does not reach are refit on their mask all the same."""
    rows, cols = weight0.shape
    h = hessian.double()
    h = h + ridge * torch.diagonal(h).mean().clamp_min(1e-12) * torch.eye(
        cols, dtype=h.dtype, device=h.device)
    w0 = weight0.double()
    groups = group_ids((rows, cols), pattern).to(w0.device)
    order = torch.argsort(reconstruction_error(w0, start, h), descending=True).tolist()
    if pattern.kind == "unstructured":
        units = [[order[i], order[rows - 1 - i]] for i in range(rows // 2)]
        units += [[order[rows // 2]]] if rows % 2 else []
    else:
        units = [[r] for r in order]
    weight = torch.empty_like(w0)
    mask = mask.clone()
    reached = torch.zeros(rows, dtype=torch.bool, device=w0.device)
    rng = np.random.default_rng(seed)
    begin = time.perf_counter()
    taken = accepted = visited = settled = 0
    late_steps = late_accepts = 0
    for i, unit in enumerate(units):
        unit_end = unit_steps = None
        if seconds is not None:
            left = seconds - (time.perf_counter() - begin)
            if left <= 0:
                break
            unit_end = time.perf_counter() + left / (len(units) - i)
        if steps is not None:
            unit_steps = steps // len(units) + (1 if i < steps % len(units) else 0)
            if unit_steps == 0:
                break
        refits = [RowRefit(h, w0[r], mask[r]) for r in unit]
        unit_groups = [groups[r] - groups[r].min() for r in unit]
        visited += len(unit)
        done = rejected = 0
        history: list[bool] = []
        while (unit_steps is None or done < unit_steps) and (
                unit_end is None or done < min_steps or time.perf_counter() < unit_end):
            blocks = [choose_row_block(row, g, block_size // len(unit), rng)
                      for row, g in zip(refits, unit_groups, strict=True)]
            ok, _ = refit_step(refits, blocks, unit_groups, solver, int(rng.integers(2**31)))
            done += 1
            history.append(ok)
            rejected = 0 if ok else rejected + 1
            if rejected >= patience:
                settled += len(unit)
                break
        taken += done
        accepted += sum(history)
        late_steps += len(history[-patience:])
        late_accepts += sum(history[-patience:])
        for r, row in zip(unit, refits, strict=True):
            weight[r], mask[r], reached[r] = row.weight, row.keep, True
    rest = (~reached).nonzero().squeeze(1)
    if len(rest):  # rows the budget did not reach: refit on their mask all the same
        weight[rest] = least_squares_update(weight0[rest], h.float(), mask[rest], damp=0.0,
                                            start=start[rest]).double()
    return RefitResult(weight=(weight * mask).float(), mask=mask, steps=taken,
                       accepted=accepted, rows_visited=visited, rows_settled=settled,
                       late_acceptance=late_accepts / max(late_steps, 1),
                       seconds=time.perf_counter() - begin)
