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

Rows are stepped in batches: every tensor of `RowsRefit` has a leading row dimension, one
step makes a block per row and hands the solver one QUBO per row, built together and solved as
one stack (`Solver.solve_stack`: one kernel call for the greedy solver), so the linear algebra
of hundreds of rows is one batched call instead of hundreds of small ones.
A batch holds rows with equally many kept weights (per_output and N:M keep that count
fixed); `unstructured` pairs single-row batches whose QUBOs share one count.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from icbs.block_qubo import build_block_qubos
from icbs.masks import Pattern, group_ids
from icbs.reconstruct import least_squares_update, reconstruction_error

REFRESH_EVERY = 64  # accepted steps of a row between fresh inverses (bounds rounding drift)
BATCH_ELEMENTS = 2**22  # entries of one batch's stacked inverses (32 MB in float64; on this CPU
# 2**22 made more steps per second than 2**25, see the README)


def _pairs(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, n) indices -> the (R, n, n) index pair that gathers rows and columns of them."""
    return index[:, :, None], index[:, None, :]


def _gather(matrices: torch.Tensor, index: torch.Tensor, cols: torch.Tensor | None = None):
    """matrices[r][index[r]][:, cols[r]] for every r of a (R, n, n) stack."""
    cols = index if cols is None else cols
    batch = torch.arange(len(matrices), device=matrices.device)[:, None, None]
    return matrices[batch, index[:, :, None], cols[:, None, :]]


class RowsRefit:
    """Rows of one layer with equally many kept weights: kept sets (R, k), the inverses of H
    on them (R, k, k) and the refit weights (R, cols), all float64."""

    def __init__(self, hessian: torch.Tensor, w0: torch.Tensor, keep: torch.Tensor):
        counts = keep.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError("a RowsRefit batch needs equally many kept weights in every row")
        self.h = hessian
        self.w0 = w0
        self.updates = torch.zeros(len(w0), dtype=torch.long, device=w0.device)
        self.kept = keep.nonzero()[:, 1].reshape(len(w0), int(counts[0]))
        self.inv, self.weight, self.error = self._refit(self.kept, self.w0)
        self._gradient = None

    def _refit(self, kept: torch.Tensor, w0: torch.Tensor):
        """Fresh inverses and least-squares weights of rows with dense weights w0 on `kept`."""
        chol, info = torch.linalg.cholesky_ex(self.h[_pairs(kept)])
        if bool(info.any()):
            raise torch.linalg.LinAlgError(
                "H restricted to a row's kept weights is singular; give damp > 0 "
                "(a ridge as a fraction of mean(diag H))")
        inv = torch.cholesky_inverse(chol)
        weight = torch.zeros_like(w0).scatter_(
            1, kept, (inv @ (w0 @ self.h).gather(1, kept)[:, :, None])[:, :, 0])
        d = weight - w0
        return inv, weight, ((d @ self.h) * d).sum(1)

    def __len__(self) -> int:
        return len(self.w0)

    @property
    def keep(self) -> torch.Tensor:
        return torch.zeros_like(self.w0, dtype=torch.bool).scatter_(1, self.kept, True)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (e.g. drop the ones that have settled)."""
        self.w0, self.kept, self.inv = self.w0[rows], self.kept[rows], self.inv[rows]
        self.weight, self.error, self.updates = self.weight[rows], self.error[rows], \
            self.updates[rows]
        self._gradient = None

    def gradient(self) -> torch.Tensor:
        """H (w - w0) per row: half the error's gradient; zero on the kept set at the refit."""
        if self._gradient is None:
            self._gradient = (self.weight - self.w0) @ self.h
        return self._gradient

    def prune_costs(self) -> torch.Tensor:
        """Exact error increase of pruning each kept weight alone (OBS: w_i^2 / [H_KK^-1]_ii)."""
        return self.weight.gather(1, self.kept) ** 2 / torch.diagonal(self.inv, dim1=1, dim2=2)

    def free_blocks(self, blocks: torch.Tensor) -> FreeBlocks:
        """Every row's block problem on F = K + its block's pruned weights (module docstring);
        `blocks` (R, B) must hold equally many pruned weights in every row."""
        k = self.kept.shape[1]
        in_k = torch.full_like(self.w0, -1, dtype=torch.long).scatter_(
            1, self.kept, torch.arange(k, device=self.kept.device).expand_as(self.kept))
        pos = in_k.gather(1, blocks)
        is_added = pos < 0
        added_count = int(is_added[0].sum())
        if bool((is_added.sum(1) != added_count).any()):
            raise ValueError("every row's block must hold equally many pruned weights")
        order = torch.argsort(is_added.to(torch.int8), dim=1, stable=True)  # kept ones first
        block, pos = blocks.gather(1, order), pos.gather(1, order)
        nk = block.shape[1] - added_count
        added, kept_pos = block[:, nk:], pos[:, :nk]
        h_ku = self.h[self.kept[:, :, None], added[:, None, :]]
        ac = self.inv @ h_ku  # H_KK^-1 H_KU
        schur_inv = torch.linalg.inv(self.h[_pairs(added)] - h_ku.transpose(1, 2) @ ac)
        g = self.gradient().gather(1, added)
        # Newton step from the refit on K to the refit on F (the gradient is zero on K).
        step_added = -(schur_inv @ g[:, :, None])
        y = self.weight.clone().scatter_(1, added, step_added[:, :, 0])
        y.scatter_add_(1, self.kept, -(ac @ step_added)[:, :, 0])
        # M_BB of M = (H_FF)^-1 by the bordering formula, the block ordered as (kept, added).
        ac_b = ac.gather(1, kept_pos[:, :, None].expand(-1, -1, added_count))
        m_kb_u = -ac_b @ schur_inv
        m_bb = torch.cat([torch.cat([_gather(self.inv, kept_pos) - m_kb_u @ ac_b.transpose(1, 2),
                                     m_kb_u], 2),
                          torch.cat([m_kb_u.transpose(1, 2), schur_inv], 2)], 1)
        free_pos = torch.cat([kept_pos, k + torch.arange(added_count, device=pos.device)
                              .expand(len(pos), -1)], 1)
        return FreeBlocks(block=block, added=added, free_pos=free_pos, ac=ac,
                          schur_inv=schur_inv, y=y, m_bb=m_bb,
                          error=self.error + (g * step_added[:, :, 0]).sum(1))

    def apply(self, fb: FreeBlocks, pruned: torch.Tensor, error: torch.Tensor,
              take: torch.Tensor) -> None:
        """Move the rows where `take` to the refit with their block positions `pruned` (R, p)
        pruned (exact errors `error`), by the OBS update on F for the new kept set
        S = F - P. With M = (H_FF)^-1 = D + Z T Z^T (D: H_KK^-1 bordered by zeros,
        Z = [H_KK^-1 H_KU; -I], T = fb.schur_inv), the inverse on S is

            M_SS - M_SP M_PP^-1 M_PS = D_SS + L diag(T, -M_PP^-1) L^T,  L = [Z_S, M_SP],

        a rank-(u + p) update of D_SS. When p equals the blocks' added count u, the count is
        kept, the newcomers take the slots of the pruned kept weights and the update is made
        in place; another p (unstructured pairs) changes k and must cover the whole batch."""
        k, u = self.kept.shape[1], fb.added.shape[1]
        if pruned.shape[1] != u and not bool(take.all()):
            raise ValueError("a step that changes a batch's kept count must cover every row")
        batch = len(self)
        device = self.kept.device
        p = fb.free_pos.gather(1, pruned)  # positions in F = (K, U)
        if pruned.shape[1] == u:
            out = torch.zeros(batch, k + u, dtype=torch.bool, device=device).scatter_(1, p, True)
            replaced, newcomer = out[:, :k], ~out[:, k:]
            # as many newcomers as replaced kept weights: at most min(k, u) of either
            m = min(k, u)
            slots = torch.argsort((~replaced).to(torch.int8), dim=1, stable=True)[:, :m]
            comers = torch.argsort((~newcomer).to(torch.int8), dim=1, stable=True)[:, :m]
            valid = torch.arange(m, device=device) < newcomer.sum(1, keepdim=True)
            s_pos = torch.arange(k, device=device).expand(batch, k).clone().scatter_(
                1, slots, torch.where(valid, k + comers, slots))
        else:
            stay = torch.ones(batch, k + u, dtype=torch.bool, device=device).scatter_(1, p, False)
            s_pos = stay.nonzero()[:, 1].reshape(batch, -1)

        def d_block(rows_pos, cols_pos):  # D on F positions: H_KK^-1 on K, zero on U
            inside = (rows_pos < k)[:, :, None] & (cols_pos < k)[:, None, :]
            if k == 0:
                return inside.to(self.inv.dtype)
            return _gather(self.inv, rows_pos.clamp_max(k - 1), cols_pos.clamp_max(k - 1)) \
                * inside

        z = torch.cat([fb.ac, -torch.eye(u, dtype=fb.ac.dtype, device=device).expand(
            batch, u, u)], 1)
        z_s = z.gather(1, s_pos[:, :, None].expand(-1, -1, u))
        z_p = z.gather(1, p[:, :, None].expand(-1, -1, u))
        m_sp = d_block(s_pos, p) + z_s @ fb.schur_inv @ z_p.transpose(1, 2)
        m_pp_inv = torch.linalg.inv(d_block(p, p) + z_p @ fb.schur_inv @ z_p.transpose(1, 2))
        m_pp_inv = (m_pp_inv + m_pp_inv.transpose(1, 2)) / 2
        free = torch.cat([self.kept, fb.added], 1)
        kept = free.gather(1, s_pos)
        y = fb.y
        weight = torch.zeros_like(y).scatter_(1, kept, y.gather(1, kept) - (
            m_sp @ (m_pp_inv @ y.gather(1, free.gather(1, p))[:, :, None]))[:, :, 0])
        if pruned.shape[1] == u:
            # D_SS is H_KK^-1 with the replaced slots' rows and columns zeroed
            rows, cols = (replaced & take[:, None]).nonzero(as_tuple=True)
            self.inv[rows, cols, :] = 0
            self.inv[rows, :, cols] = 0
        else:
            self.inv = d_block(s_pos, s_pos)
        lower = torch.cat([z_s, m_sp], 2)
        t = fb.schur_inv
        scale = torch.zeros(batch, u + m_pp_inv.shape[1], u + m_pp_inv.shape[1],
                            dtype=t.dtype, device=device)
        scale[:, :u, :u], scale[:, u:, u:] = (t + t.transpose(1, 2)) / 2, -m_pp_inv
        self.inv.baddbmm_((lower @ scale) * take[:, None, None], lower.transpose(1, 2))
        self.kept = torch.where(take[:, None], kept, self.kept) if kept.shape == \
            self.kept.shape else kept
        self.weight = torch.where(take[:, None], weight, self.weight)
        self.error = torch.where(take, error, self.error)
        self.updates += take
        stale = (take & (self.updates % REFRESH_EVERY == 0)).nonzero()[:, 0]
        if len(stale):
            self.inv[stale], self.weight[stale], self.error[stale] = self._refit(
                self.kept[stale], self.w0[stale])
        self._gradient = None


@dataclass
class FreeBlocks:
    """Every row's block problem on its free set F = K + U (U: the block's pruned weights)."""

    block: torch.Tensor  # (R, B) the block's columns, its kept ones first, then U
    added: torch.Tensor  # (R, u) U
    free_pos: torch.Tensor  # (R, B) each block column's position in F = (K, U)
    ac: torch.Tensor  # (R, k, u) H_KK^-1 H_KU
    schur_inv: torch.Tensor  # (R, u, u) (H_UU - H_UK H_KK^-1 H_KU)^-1
    y: torch.Tensor  # (R, cols) the rows' weights refit on F
    m_bb: torch.Tensor  # (R, B, B) (H_FF)^-1 on the block, in `block`'s order
    error: torch.Tensor  # (R,) e_F

    def exact_errors(self, pruned: torch.Tensor) -> torch.Tensor:
        """e(P) per row for P = the block positions `pruned` (R, p), the rest of F refit."""
        if pruned.shape[1] == 0:
            return self.error.clone()
        yp = self.y.gather(1, self.block.gather(1, pruned))
        return self.error + (yp * torch.linalg.solve(_gather(self.m_bb, pruned), yp)).sum(1)

    def effective_hessians(self) -> torch.Tensor:
        """S = (M_BB)^-1 per row: the block's Hessian with the row's other kept weights
        eliminated."""
        return torch.linalg.inv(self.m_bb)


def choose_blocks(rows: RowsRefit, groups: torch.Tensor, block_size: int,
                  gen: torch.Generator, explore: torch.Tensor | None = None,
                  pool_factor: int = 2) -> torch.Tensor:
    """(R, B) columns per row for a block: the kept weights cheapest to prune and the pruned
    ones whose return would lower the error most (gradient^2 / H_jj): the best ones, or, in
    the rows where `explore` (R,) is set (all rows when it is None), drawn at random from the
    best `pool_factor` times as many as are needed. `groups` holds the pattern's group of
    every column, the same in every row; for N:M the block is whole groups."""
    keep = rows.keep
    gain = torch.where(keep, -torch.inf, rows.gradient() ** 2 / torch.diagonal(rows.h))
    cost = torch.full_like(gain, torch.inf).scatter_(1, rows.kept, rows.prune_costs())
    group_count = int(groups.max()) + 1
    if group_count > 1:  # N:M: rank groups by their best swap, take whole groups
        index = groups.expand_as(gain)
        best_gain = torch.zeros(len(gain), group_count, dtype=gain.dtype, device=gain.device)
        best_gain.scatter_reduce_(1, index, gain.clamp_min(0), "amax")
        best_cost = torch.full_like(best_gain, torch.inf)
        best_cost.scatter_reduce_(1, index, cost, "amin")
        size = gain.shape[1] // group_count
        wanted = max(1, min(group_count, block_size // size))
        chosen = _draw(best_gain / best_cost, wanted, group_count, pool_factor, gen, explore)
        offsets = torch.arange(size, device=chosen.device)
        return (chosen[:, :, None] * size + offsets).flatten(1)
    pruned_count = int((~keep).sum(1).min())
    pruned = _draw(gain, block_size // 2, pruned_count, pool_factor, gen, explore)
    kept = _draw(-cost, block_size - pruned.shape[1], rows.kept.shape[1], pool_factor, gen,
                 explore)
    return torch.cat([pruned, kept], 1)


def check_block_choice(block_choice: str) -> None:
    """Raise unless `block_choice` is one of the block choices both step loops know."""
    if block_choice not in ("best_first", "random"):
        raise ValueError(f"block_choice must be 'best_first' or 'random', got {block_choice!r}")


def _draw(score: torch.Tensor, count: int, available: int, pool_factor: int,
          gen: torch.Generator, explore: torch.Tensor | None = None) -> torch.Tensor:
    """`count` (at most `available`, the entries of each row that score above -inf) column
    indices per row, at random from its best pool_factor x count; in the rows where
    `explore` is False, its best `count`."""
    count = min(count, available)
    pool = torch.topk(score, min(pool_factor * count, available), dim=1).indices
    order = torch.rand(pool.shape, generator=gen, dtype=torch.float64)
    if explore is not None:  # topk lists the best first: rank by position
        best = torch.arange(pool.shape[1], dtype=order.dtype).expand_as(order)
        order = torch.where(explore.cpu()[:, None], order, best)
    pick = order.argsort(1)[:, :count]
    return pool.gather(1, pick.sort(1).values.to(pool.device))


def refit_step(batches: Sequence[RowsRefit], blocks: Sequence[torch.Tensor],
               groups: torch.Tensor, solver, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block step on every row of equally long batches: row r of every batch goes into
    QUBO r (their blocks side by side, solved by one `solver.solve_stack`); `groups` holds
    the pattern's group id of every column, and equal ids share one count, across the
    batches too (the unstructured pattern's single group lets sparsity move between the
    rows of a pair). Returns
    (accepted, the exact change of the rows' summed post-refit error), one entry per QUBO."""
    fbs = [rows.free_blocks(block) for rows, block in zip(batches, blocks, strict=True)]
    y = torch.cat([fb.y.gather(1, fb.block) for fb in fbs], 1)
    hessian = torch.zeros(*y.shape, y.shape[1], dtype=y.dtype, device=y.device)
    start = 0
    for fb in fbs:
        end = start + fb.block.shape[1]
        hessian[:, start:end, start:end] = fb.effective_hessians()
        start = end
    x_now = torch.cat([~rows.keep.gather(1, fb.block) for rows, fb in zip(batches, fbs,
                                                                           strict=True)], 1)
    block_groups = torch.cat([groups[fb.block] for fb in fbs], 1)
    zero = torch.zeros_like(y)
    # E(x) - e_F as the block QUBO's model: v = y, no gradient (F's refit is stationary);
    # S + S^T is 2 S made exactly symmetric.
    stack = build_block_qubos(y, zero, zero, hessian + hessian.transpose(1, 2), x_now,
                              block_groups)
    seeds = torch.randint(2**31, (len(y),), generator=gen).tolist()
    answers, _ = solver.solve_stack(stack, x_now.cpu().numpy(), seeds)
    x = torch.as_tensor(answers, device=y.device).bool()
    before = sum(rows.error for rows in batches)
    after = torch.zeros_like(before)
    answers, start = [], 0
    for fb in fbs:
        end = start + fb.block.shape[1]
        part = x[:, start:end]
        pruned = part.nonzero()[:, 1].reshape(len(part), -1)
        errors = fb.exact_errors(pruned)
        answers.append((pruned, errors, (part != x_now[:, start:end]).any(1)))
        after += errors
        start = end
    change = torch.where((x != x_now).any(1), after - before, torch.zeros_like(before))
    accepted = change < -1e-12 * before.clamp_min(1e-300)
    for rows, fb, (pruned, errors, moved) in zip(batches, fbs, answers, strict=True):
        take = accepted & moved
        if take.any():
            rows.apply(fb, pruned, errors, take)
    return accepted, change


def _write_rows(batches: Sequence[RowsRefit], ids: Sequence[torch.Tensor],
                positions: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                reached: torch.Tensor) -> None:
    """The weights and masks of the batch rows at `positions` into the layer's tensors."""
    for batch, rows in zip(batches, ids, strict=True):
        chosen = rows[positions]
        weight[chosen], mask[chosen], reached[chosen] = \
            batch.weight[positions], batch.keep[positions], True


@dataclass
class RefitResult:
    weight: torch.Tensor  # float32, zero where pruned
    mask: torch.Tensor
    steps: int  # block steps, one per row (or row pair) and step
    accepted: int
    rows_visited: int
    rows_settled: int  # rows left after `patience` rejected steps in a row: nothing found
    late_acceptance: float  # accepted / steps over each visited row's last `patience` steps
    seconds: float  # the block steps with the rows' set-up: what the budget limits


def rows_per_batch(kept: int, block_size: int, batch_elements: int = BATCH_ELEMENTS) -> int:
    """Rows of a per-row-count batch: its stacked inverses (kept + block)^2 per row fill
    `batch_elements` entries."""
    return max(1, batch_elements // (kept + block_size) ** 2)


def improve_rows(weight0: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, *,
                 start: torch.Tensor, pattern: Pattern, block_size: int, solver, seed: int,
                 damp: float, seconds: float | None = None, steps: int | None = None,
                 patience: int = 16, min_steps: int = 1, refit_unreached: bool = True,
                 batch_elements: int = BATCH_ELEMENTS,
                 block_choice: str = "best_first") -> RefitResult:
    """Refit-aware block steps on every row of a layer, the worst rows (by the error of
    `start`, the current weights) first. Rows go in batches (as many as fit in
    `batch_elements` entries of stacked inverses) that step together; each batch gets its
    rows' share of what is left of the budget but, while the budget lasts, at least
    `min_steps` steps (so that no set-up is spent without a step; a row's first steps gain
    the most, so a small budget is best spread thin), and no batch starts when what is left
    is less than the last one took for its set-up and those steps; the budget is overrun by
    at most one step. A row leaves its batch after `patience` rejected steps in a row.
    `steps` counts block steps of single rows (a row pair's step counts
    once), shared out equally. For `unstructured` the rows go in pairs, the worst with the
    best, sharing one count, so that sparsity moves to where it costs least. The error is
    (w - w0)^T (H + damp * mean(diag H) I) (w - w0). Rows the budget does not reach are
    refit on their mask all the same (or, without `refit_unreached`, keep `start`) after
    the budget: `seconds` leaves that refit out. `block_choice` "best_first" takes a row's
    best candidates and draws at random only after a rejected step; "random" always draws
    (the choice before session 11, kept for comparison)."""
    check_block_choice(block_choice)
    rows, cols = weight0.shape
    h = hessian.double()
    h = h + damp * torch.diagonal(h).mean().clamp_min(1e-12) * torch.eye(
        cols, dtype=h.dtype, device=h.device)
    w0 = weight0.double()
    groups = group_ids((1, cols), pattern)[0].to(w0.device)  # a row's groups, 0-based
    order = torch.argsort(reconstruction_error(w0, start, h), descending=True).tolist()
    if pattern.kind == "unstructured":  # units of two single-row batches sharing a count
        units = [[[order[i]], [order[rows - 1 - i]]] for i in range(rows // 2)]
        units += [[[order[rows // 2]]]] if rows % 2 else []
    else:
        size = rows_per_batch(int(mask[0].sum()), block_size, batch_elements)
        units = [[order[i:i + size]] for i in range(0, rows, size)]
    slots = [r for unit in units for r in unit[0]]  # one per QUBO: a row or a row pair
    quota = None if steps is None else {
        r: steps // len(slots) + (i < steps % len(slots)) for i, r in enumerate(slots)}
    weight = torch.empty_like(w0)
    mask = mask.clone()
    reached = torch.zeros(rows, dtype=torch.bool, device=w0.device)
    gen = torch.Generator().manual_seed(seed)
    begin = time.perf_counter()
    taken = accepted = visited = settled = late_steps = late_accepts = 0
    done_rows = 0
    least = 0.0  # seconds the last batch took for its set-up and first min_steps steps
    for unit in units:
        unit_rows = sum(len(batch) for batch in unit)
        if quota is not None:  # rows without steps are left to the final refit
            live = [i for i, r in enumerate(unit[0]) if quota[r] > 0]
            unit = [[batch[i] for i in live] for batch in unit]
            if not unit[0]:
                break
        unit_end = None
        if seconds is not None:
            left = seconds - (time.perf_counter() - begin)
            if left <= least:  # not even the steps every batch takes: leave it to the refit
                break
            unit_end = time.perf_counter() + left * unit_rows / (len(order) - done_rows)
        done_rows += unit_rows
        unit_start = time.perf_counter()
        ids = [torch.tensor(batch, device=w0.device) for batch in unit]
        batches = [RowsRefit(h, w0[i], mask[i]) for i in ids]
        width = block_size // len(batches)
        limit = None if quota is None else torch.tensor([quota[r] for r in unit[0]])
        count = torch.zeros(len(ids[0]), dtype=torch.long)
        rejected = torch.zeros_like(count)
        recent = torch.zeros(len(ids[0]), patience, dtype=torch.bool)  # last steps, a ring
        visited += sum(len(i) for i in ids)
        done = 0
        while len(ids[0]) and (unit_end is None or time.perf_counter() < unit_end or (
                done < min_steps and time.perf_counter() < begin + seconds)):
            explore = rejected > 0 if block_choice == "best_first" else None
            blocks = [choose_blocks(b, groups, width, gen, explore=explore) for b in batches]
            ok, _ = refit_step(batches, blocks, groups, solver, gen)
            ok = ok.cpu()
            taken += len(ok)
            recent[torch.arange(len(ok)), count % patience] = ok
            count += 1
            done += 1
            if done == min_steps:
                least = time.perf_counter() - unit_start
            rejected = torch.where(ok, 0, rejected + 1)
            leaving = rejected >= patience
            if limit is not None:
                leaving |= count >= limit
            if leaving.any():
                settled += int((rejected >= patience).sum()) * len(batches)
                out = leaving.nonzero()[:, 0]
                late_steps += int(count[out].clamp_max(patience).sum())
                late_accepts += int(recent[out].sum())
                _write_rows(batches, ids, out, weight, mask, reached)
                stay = (~leaving).nonzero()[:, 0]
                for b in batches:
                    b.select(stay)
                ids = [i[stay] for i in ids]
                count, rejected, recent = count[stay], rejected[stay], recent[stay]
                if limit is not None:
                    limit = limit[stay]
            accepted += int(ok.sum())
        late_steps += int(count.clamp_max(patience).sum())
        late_accepts += int(recent.sum())
        _write_rows(batches, ids, torch.arange(len(ids[0])), weight, mask, reached)
    seconds_used = time.perf_counter() - begin
    rest = (~reached).nonzero().squeeze(1)
    if len(rest):  # rows the budget did not reach
        weight[rest] = start[rest].double() if not refit_unreached else least_squares_update(
            weight0[rest], h.float(), mask[rest], damp=0.0, start=start[rest]).double()
    return RefitResult(weight=(weight * mask).float(), mask=mask, steps=taken,
                       accepted=accepted, rows_visited=visited, rows_settled=settled,
                       late_acceptance=late_accepts / max(late_steps, 1),
                       seconds=seconds_used)
