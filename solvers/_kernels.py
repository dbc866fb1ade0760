"""Numba kernels for swap moves inside groups, on cached local fields f = Q x.

Layout shared by the kernels: `perm` lists the variables group by group; group g owns
positions gstart[g] .. gstart[g] + gsize[g] - 1, the first gk[g] of them hold its ones
(x = 1) and the rest its zeros. A swap exchanges a one and a zero of the same group, so
every group count stays at k_g.

Energy change of a swap that sets x_i: 1 -> 0 and x_j: 0 -> 1 (Q symmetric, f = Q x):
removing i changes E by -(2 f_i - Q_ii) and lowers f_j by Q_ij; adding j then changes E by
2 (f_j - Q_ij) + Q_jj. In total

    dE = -(2 f_i - Q_ii) + (2 f_j + Q_jj) - 2 Q_ij,

O(1) from the cached fields; accepting updates f += Q[j] - Q[i] (two contiguous rows, O(n)).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def layout(x: np.ndarray, groups: np.ndarray, k: np.ndarray, sizes: np.ndarray):
    """Return (perm, gstart, movable) for state x (see module docstring)."""
    gstart = group_starts(sizes)
    return group_perm(x, groups, gstart, k), gstart, movable_of(groups, k, sizes)


@njit(cache=True)
def group_starts(gsize):
    """First position of every group in `perm`."""
    gstart = np.zeros(gsize.size, dtype=np.int64)
    for g in range(1, gsize.size):
        gstart[g] = gstart[g - 1] + gsize[g - 1]
    return gstart


@njit(cache=True)
def group_perm(x, groups, gstart, gk):
    """`perm` of state x: group by group, its ones first, each part in index order."""
    perm = np.empty(x.size, dtype=np.int64)
    ones = gstart.copy()
    zeros = gstart + gk
    for i in range(x.size):
        g = groups[i]
        if x[i]:
            perm[ones[g]] = i
            ones[g] += 1
        else:
            perm[zeros[g]] = i
            zeros[g] += 1
    return perm


@njit(cache=True)
def movable_of(groups, gk, gsize):
    """The variables of groups that have a swap (0 < k_g < |g|), in index order."""
    movable = np.empty(groups.size, dtype=np.int64)
    count = 0
    for i in range(groups.size):
        g = groups[i]
        if 0 < gk[g] < gsize[g]:
            movable[count] = i
            count += 1
    return movable[:count]


@njit(cache=True)
def row_max_offdiag(Q):
    """max_{j != i} Q_ij for every row (-inf for n = 1)."""
    n = Q.shape[0]
    out = np.full(n, -np.inf)
    for i in range(n):
        m = -np.inf
        for j in range(n):
            if j != i and Q[i, j] > m:
                m = Q[i, j]
        out[i] = m
    return out


@njit(cache=True)
def fields(Q, x):
    """f = Q x for an int8 x, summing only the rows of ones (row-contiguous)."""
    n = Q.shape[0]
    f = np.zeros(n)
    for j in range(n):
        if x[j]:
            for i in range(n):
                f[i] += Q[j, i]
    return f


@njit(cache=True)
def sample_swap_deltas(Q, f, perm, gstart, gk, gsize, groups, movable, num, seed):
    """|dE| of `num` random swaps from the current state (for the temperature schedule)."""
    np.random.seed(seed)
    out = np.empty(num)
    nm = movable.size
    for t in range(num):
        u = movable[np.random.randint(nm)]
        g = groups[u]
        a = gstart[g] + np.random.randint(gk[g])
        b = gstart[g] + gk[g] + np.random.randint(gsize[g] - gk[g])
        i = perm[a]
        j = perm[b]
        out[t] = abs(-(2 * f[i] - Q[i, i]) + (2 * f[j] + Q[j, j]) - 2 * Q[i, j])
    return out


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, inline="always")
def _splitmix(state):
    """One step of splitmix64: returns (new state, 64 random bits)."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return state, z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _below(bits, m):
    """An integer in 0 .. m-1 from the top 32 of 64 random bits (multiply-shift, m < 2**32)."""
    return np.int64(((bits >> np.uint64(32)) * np.uint64(m)) >> np.uint64(32))


@njit(cache=True)
def anneal_swaps(Q, diag, x, f, perm, gstart, gk, gsize, groups, movable, betas,
                 proposals_per_beta, seed, best_x):
    """Simulated annealing with in-group swaps; x, f, perm are updated in place.

    Makes `proposals_per_beta` proposals at each inverse temperature. Returns (best dE
    relative to the start, final dE relative to the start, accepted moves); `best_x`
    receives the best state seen. Random numbers come from an inlined splitmix64 generator
    seeded with `seed` (one 64-bit draw picks both ends of a swap): a proposal costs about
    20 ns at n = 256 against about 50 ns with numba's np.random, so the proposal budget goes
    to the search rather than to the generator.
    """
    state = np.uint64(seed)
    n = Q.shape[0]
    nm = movable.size
    single = gstart.size == 1
    e = 0.0
    best = 0.0
    best_is_current = True
    accepted = 0
    if nm == 0:
        best_x[:] = x
        return best, e, accepted
    g = groups[movable[0]]
    for bi in range(betas.size):
        beta = betas[bi]
        for _t in range(proposals_per_beta):
            if not single:
                state, r = _splitmix(state)
                g = groups[movable[_below(r, nm)]]
            kg = gk[g]
            state, r = _splitmix(state)
            a = gstart[g] + _below(r, kg)
            # the low 32 bits of the same draw pick the zero
            b = gstart[g] + kg + np.int64(((r & np.uint64(0xFFFFFFFF))
                                           * np.uint64(gsize[g] - kg)) >> np.uint64(32))
            i = perm[a]
            j = perm[b]
            de = -(2.0 * f[i] - diag[i]) + (2.0 * f[j] + diag[j]) - 2.0 * Q[i, j]
            if de > 0.0:
                z = beta * de
                if z > 40.0:
                    continue
                state, r = _splitmix(state)
                if (r >> np.uint64(11)) * (1.0 / 9007199254740992.0) >= np.exp(-z):
                    continue
            # accept: i leaves the ones, j joins them
            if best_is_current:
                best_x[:] = x  # leaving the best state seen: keep a copy
                best_is_current = False
            perm[a] = j
            perm[b] = i
            x[i] = 0
            x[j] = 1
            qi = Q[i]
            qj = Q[j]
            for r_ in range(n):
                f[r_] += qj[r_] - qi[r_]
            e += de
            accepted += 1
            if e < best:
                best = e
                best_is_current = True
    if best_is_current:
        best_x[:] = x
    return best, e, accepted


@njit(cache=True)
def polish_swaps(Q, x, f, perm, gstart, gk, gsize, rowmax, max_swaps):
    """Best-improvement swap descent inside each group until no swap lowers E.

    Visits the groups in turn; in a group, finds the swap with the lowest dE (pruned
    by the bound dE >= min_j b_j - a_i - 2 max_j Q_ij, with a_i = 2 f_i - Q_ii and
    b_j = 2 f_j + Q_jj) and applies it while it improves. Stops after a full pass without
    a swap, or after `max_swaps` swaps. Returns (total dE, swaps made, passes).
    """
    n = Q.shape[0]
    G = gstart.size
    total = 0.0
    swaps = 0
    passes = 0
    changed = True
    while changed and swaps < max_swaps:
        changed = False
        passes += 1
        for g in range(G):
            kg = gk[g]
            nz = gsize[g] - kg
            if kg == 0 or nz == 0:
                continue
            s0 = gstart[g]
            while swaps < max_swaps:
                # gains of removing each one, costs of adding each zero
                a_val = np.empty(kg)
                for p in range(kg):
                    i = perm[s0 + p]
                    a_val[p] = 2.0 * f[i] - Q[i, i]
                bmin = np.inf
                for p in range(nz):
                    j = perm[s0 + kg + p]
                    bj = 2.0 * f[j] + Q[j, j]
                    if bj < bmin:
                        bmin = bj
                order = np.argsort(-a_val)
                best = 0.0
                best_a = -1
                best_b = -1
                for oi in range(kg):
                    p = order[oi]
                    i = perm[s0 + p]
                    ai = a_val[p]
                    if bmin - ai - 2.0 * rowmax[i] >= best:
                        continue
                    qi = Q[i]
                    for q in range(nz):
                        j = perm[s0 + kg + q]
                        d = (2.0 * f[j] + Q[j, j]) - ai - 2.0 * qi[j]
                        if d < best:
                            # ignore changes at the level of rounding error
                            tol = 1e-12 * (abs(ai) + abs(2.0 * f[j] + Q[j, j]) + 2 * abs(qi[j]))
                            if d < -tol:
                                best = d
                                best_a = s0 + p
                                best_b = s0 + kg + q
                if best_a < 0:
                    break
                i = perm[best_a]
                j = perm[best_b]
                perm[best_a] = j
                perm[best_b] = i
                x[i] = 0
                x[j] = 1
                qi = Q[i]
                qj = Q[j]
                for r in range(n):
                    f[r] += qj[r] - qi[r]
                total += best
                swaps += 1
                changed = True
    return total, swaps, passes


@njit(cache=True, parallel=True)
def polish_many(Q, x, perm, gstart, gk, gsize, max_swaps):
    """`polish_swaps` on each of a stack of problems (Q: (P, n, n), the others one row per
    problem) from x, which is updated in place, in parallel; returns the energies x^T Q x."""
    energies = np.zeros(Q.shape[0])
    for p in prange(Q.shape[0]):
        f = fields(Q[p], x[p])
        polish_swaps(Q[p], x[p], f, perm[p], gstart[p], gk[p], gsize[p],
                     row_max_offdiag(Q[p]), max_swaps)
        energies[p] = ones_sum(f, x[p])
    return energies


@njit(cache=True)
def ones_sum(f, x):
    """sum of f over the ones of x: the energy x^T Q x when f = Q x."""
    e = 0.0
    for i in range(x.size):
        if x[i]:
            e += f[i]
    return e


@njit(cache=True)
def repair_counts(Q, x, f, groups, k, counts):
    """Flip variables greedily until every group g has exactly k[g] ones.

    In a group with too many ones, flip to 0 the one whose removal lowers E most
    (dE = -(2 f_i - Q_ii)); with too few, flip to 1 the zero with the lowest
    dE = 2 f_j + Q_jj. f is updated after every flip. Returns the number of flips.
    """
    n = Q.shape[0]
    flips = 0
    for g in range(k.size):
        while counts[g] != k[g]:
            want_one = counts[g] < k[g]
            bi = -1
            bd = np.inf
            for i in range(n):
                if groups[i] != g:
                    continue
                if want_one and x[i] == 0:
                    d = 2.0 * f[i] + Q[i, i]
                elif (not want_one) and x[i] == 1:
                    d = -(2.0 * f[i] - Q[i, i])
                else:
                    continue
                if d < bd:
                    bd = d
                    bi = i
            qi = Q[bi]
            if want_one:
                x[bi] = 1
                counts[g] += 1
                for r in range(n):
                    f[r] += qi[r]
            else:
                x[bi] = 0
                counts[g] -= 1
                for r in range(n):
                    f[r] -= qi[r]
            flips += 1
    return flips


@njit(cache=True)
def polish_sweep(Q, diag, x, f, perm, gstart, gk, gsize, rowmax, max_swaps):
    """Swap descent that ends, like `polish_swaps`, where no swap lowers E, but cheaper per
    swap: each pass visits the ones of each group (largest removal gain first) and applies
    the best swap of that one, if it improves, at once. Returns (total dE, swaps, passes).
    """
    n = Q.shape[0]
    G = gstart.size
    total = 0.0
    swaps = 0
    passes = 0
    changed = True
    while changed and swaps < max_swaps:
        changed = False
        passes += 1
        for g in range(G):
            kg = gk[g]
            nz = gsize[g] - kg
            if kg == 0 or nz == 0:
                continue
            s0 = gstart[g]
            ones = perm[s0 : s0 + kg].copy()
            zeros = perm[s0 + kg : s0 + kg + nz].copy()
            a_val = np.empty(kg)
            for p in range(kg):
                i = ones[p]
                a_val[p] = 2.0 * f[i] - diag[i]
            order = np.argsort(-a_val)
            bz = np.empty(nz)
            bmin = np.inf
            for q in range(nz):
                j = zeros[q]
                bz[q] = 2.0 * f[j] + diag[j]
                if bz[q] < bmin:
                    bmin = bz[q]
            for oi in range(kg):
                if swaps >= max_swaps:
                    break
                p = order[oi]
                i = ones[p]
                ai = 2.0 * f[i] - diag[i]
                if bmin - ai - 2.0 * rowmax[i] >= 0.0:
                    continue
                qi = Q[i]
                best = 0.0
                best_q = -1
                for q in range(nz):
                    d = bz[q] - ai - 2.0 * qi[zeros[q]]
                    if d < best:
                        tol = 1e-12 * (abs(ai) + abs(bz[q]) + 2.0 * abs(qi[zeros[q]]))
                        if d < -tol:
                            best = d
                            best_q = q
                if best_q < 0:
                    continue
                j = zeros[best_q]
                ones[p] = j
                zeros[best_q] = i
                x[i] = 0
                x[j] = 1
                qj = Q[j]
                for r in range(n):
                    f[r] += qj[r] - qi[r]
                total += best
                swaps += 1
                changed = True
                bmin = np.inf
                for q in range(nz):
                    jj = zeros[q]
                    bz[q] = 2.0 * f[jj] + diag[jj]
                    if bz[q] < bmin:
                        bmin = bz[q]
            perm[s0 : s0 + kg] = ones
            perm[s0 + kg : s0 + kg + nz] = zeros
    return total, swaps, passes


@njit(cache=True)
def swap_delta_scale(Q, x, groups, gk, gsize, seed, quantile):
    """(median, `quantile` percentile) of the positive |dE| of random swaps from x, the scale
    of the annealing schedule; NaN for both when no swap changes E."""
    movable = movable_of(groups, gk, gsize)
    if movable.size == 0:
        return np.nan, np.nan
    gstart = group_starts(gsize)
    num = min(2000, max(200, 4 * movable.size))
    d = sample_swap_deltas(Q, fields(Q, x), group_perm(x, groups, gstart, gk), gstart, gk,
                           gsize, groups, movable, num, seed)
    d = d[d > 0]
    if d.size == 0:
        return np.nan, np.nan
    return np.median(d), np.percentile(d, quantile)


@njit(cache=True, parallel=True)
def swap_delta_scales(Q, x, groups, gk, gsize, seeds, quantile):
    """`swap_delta_scale` of every problem of a stack, in parallel."""
    median = np.empty(len(Q))
    low = np.empty(len(Q))
    for p in prange(len(Q)):
        median[p], low[p] = swap_delta_scale(Q[p], x[p], groups[p], gk[p], gsize[p], seeds[p],
                                             quantile)
    return median, low


@njit(cache=True)
def anneal_restarts(Q, start, groups, gk, gsize, betas, sweeps_per_beta, min_proposals, seeds,
                    polish, answers):
    """One `anneal_swaps` run from `start` per seed, each ended by a `polish_sweep` when
    `polish`; run r's answer (its best state) goes to answers[r]. Returns (accepted moves,
    polish swaps, proposals made)."""
    diag = np.diag(Q).copy()
    f0 = fields(Q, start)
    gstart = group_starts(gsize)
    movable = movable_of(groups, gk, gsize)
    rowmax = row_max_offdiag(Q) if polish else diag
    proposals = max(movable.size * sweeps_per_beta, min_proposals)
    accepted = 0
    swaps = 0
    x = np.empty_like(start)
    f = np.empty_like(f0)
    for r in range(seeds.size):
        x[:] = start
        f[:] = f0
        xb = answers[r]
        accepted += anneal_swaps(Q, diag, x, f, group_perm(x, groups, gstart, gk), gstart, gk,
                                 gsize, groups, movable, betas, proposals, seeds[r], xb)[2]
        if polish:
            swaps += polish_sweep(Q, diag, xb, fields(Q, xb), group_perm(xb, groups, gstart, gk),
                                  gstart, gk, gsize, rowmax, np.iinfo(np.int64).max)[1]
    return accepted, swaps, proposals * betas.size * seeds.size


@njit(cache=True, parallel=True)
def anneal_many(Q, starts, groups, gk, gsize, betas, sweeps_per_beta, min_proposals, seeds,
                polish):
    """`anneal_restarts` on every problem of a stack (row p of each argument), in parallel;
    returns each problem's lowest-energy answer (the first of equals)."""
    answers = np.empty_like(starts)
    for p in prange(len(Q)):
        runs = np.empty((seeds.shape[1], starts.shape[1]), dtype=starts.dtype)
        anneal_restarts(Q[p], starts[p], groups[p], gk[p], gsize[p], betas[p], sweeps_per_beta,
                        min_proposals, seeds[p], polish, runs)
        best = np.inf
        for r in range(len(runs)):
            e = ones_sum(fields(Q[p], runs[r]), runs[r])
            if e < best:
                best = e
                answers[p] = runs[r]
    return answers
