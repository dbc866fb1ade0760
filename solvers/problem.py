"""`CardinalityQUBO`: minimize x^T Q x + const subject to sum_{i in g} x_i = k_g per group g."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Rows per chunk when checking large matrices, to bound temporary memory.
_CHUNK_ROWS = 512


def _check_matrix(Q: np.ndarray, copy: bool, symmetric: bool = False) -> np.ndarray:
    """Return Q as a float64 C-contiguous symmetric matrix, or raise ValueError."""
    try:
        Q = (np.array(Q, dtype=np.float64, order="C") if copy
             else np.ascontiguousarray(Q, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Q must be a numeric square matrix: {exc}") from None
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"Q must be a square matrix, got shape {Q.shape}")
    n = Q.shape[0]
    asymmetric = False
    for r0 in range(0, n, _CHUNK_ROWS):
        rows = Q[r0 : r0 + _CHUNK_ROWS]
        if not np.isfinite(rows).all():
            bad = np.argwhere(~np.isfinite(rows))[0]
            raise ValueError(f"Q must be finite; Q[{r0 + bad[0]}, {bad[1]}] = {rows[tuple(bad)]}")
        if not (symmetric or asymmetric) and not np.array_equal(rows, Q[:, r0:r0 + _CHUNK_ROWS].T):
            asymmetric = True
    if asymmetric:
        # x^T Q x == x^T ((Q + Q^T) / 2) x for every x, so symmetrizing keeps every energy.
        log.debug("Q is not symmetric; using (Q + Q^T) / 2, which has the same energies")
        if not copy:
            Q = Q.copy()  # never modify the caller's array
        for r0 in range(0, n, _CHUNK_ROWS):
            r1 = min(n, r0 + _CHUNK_ROWS)
            block = 0.5 * Q[r0:r1, r0:] + 0.5 * Q[r0:, r0:r1].T  # no overflow near the limit
            Q[r0:r1, r0:] = block
            Q[r0:, r0:r1] = block.T
    with np.errstate(over="ignore"):
        bound = float(np.abs(Q).sum())  # >= |x^T Q x| for every x in {0, 1}^n
    if not np.isfinite(bound):
        raise ValueError("Q is too large: sum |Q_ij| overflows float64, so energies would "
                         "too; scale Q down")
    return Q


class CardinalityQUBO:
    """Minimize E(x) = x^T Q x + const over x in {0,1}^n with sum_{i in g} x_i = k_g.

    Parameters
    ----------
    Q : (n, n) array-like, finite. Symmetric; the diagonal holds the linear terms (x_i^2 = x_i).
        A non-symmetric Q is replaced by (Q + Q^T) / 2, which gives every x the same energy.
    k : int, or one int per group: how many variables of each group must be 1 (pruned);
        0 <= k_g <= |g|.
    groups : int array of length n with values 0..G-1 (every group non-empty); None = one group.
    const : constant added to every energy.
    copy : copy Q (default). With ``copy=False`` a float64 C-contiguous symmetric Q is used
        in place, which matters for very large n; do not modify it afterwards.
    symmetric : the caller guarantees Q is exactly symmetric, so the O(n^2) symmetry check is
        skipped (the pruning loop builds Q symmetric; finiteness is still checked).

    Any bad input raises ``ValueError`` naming what is wrong.
    """

    def __init__(
        self,
        Q: Any,
        k: int | Any,
        groups: Any = None,
        const: float = 0.0,
        *,
        copy: bool = True,
        symmetric: bool = False,
    ) -> None:
        self.Q = _check_matrix(Q, copy, symmetric)
        n = self.n = int(self.Q.shape[0])
        if groups is None:
            groups = np.zeros(n, dtype=np.int64)
        else:
            groups_in = np.asarray(groups)
            if groups_in.shape != (n,):
                raise ValueError(f"groups must have length n={n}, got shape {groups_in.shape}")
            if n and not np.issubdtype(groups_in.dtype, np.integer):
                if not np.all(np.mod(groups_in, 1) == 0):
                    raise ValueError("groups must hold integers 0..G-1")
            groups = groups_in.astype(np.int64)
        num_groups = int(groups.max()) + 1 if n else (1 if np.ndim(k) == 0 else len(k))
        if n and groups.min() < 0:
            raise ValueError(f"groups must hold integers 0..G-1, found {groups.min()}")
        sizes = np.bincount(groups, minlength=num_groups) if n else np.zeros(num_groups, int)
        if n and (sizes == 0).any():
            raise ValueError(
                f"groups must use every label 0..{num_groups - 1}; "
                f"empty: {np.flatnonzero(sizes == 0).tolist()}"
            )
        k_arr = np.asarray(k)
        if k_arr.ndim == 0:
            k_arr = np.full(num_groups, k_arr)
        if k_arr.shape != (num_groups,):
            raise ValueError(
                f"k must be an int or one int per group ({num_groups} groups), "
                f"got shape {k_arr.shape}"
            )
        if k_arr.size and not (np.issubdtype(k_arr.dtype, np.integer)
                               or np.all(np.mod(k_arr, 1) == 0)):
            raise ValueError(f"k must be integers, got {k_arr.tolist()}")
        k_arr = k_arr.astype(np.int64)
        bad = np.flatnonzero((k_arr < 0) | (k_arr > sizes))
        if bad.size:
            g = int(bad[0])
            raise ValueError(f"k[{g}] = {k_arr[g]} is outside 0..{sizes[g]} (size of group {g})")
        const = float(const)
        if not np.isfinite(const):
            raise ValueError(f"const must be finite, got {const}")
        self.groups = groups
        self.k = k_arr
        self.sizes = sizes.astype(np.int64)
        self.const = const

    # ------------------------------------------------------------------ basics
    @property
    def num_groups(self) -> int:
        return int(self.k.size)

    def __repr__(self) -> str:
        return (
            f"CardinalityQUBO(n={self.n}, groups={self.num_groups}, "
            f"k={self.k.sum()} in total, const={self.const:g})"
        )

    def check_state(self, x: Any, what: str = "x") -> np.ndarray:
        """Return `x` as an int8 0/1 array if it is a feasible state, else raise ValueError."""
        arr = np.asarray(x)
        if arr.shape != (self.n,):
            raise ValueError(f"{what} must have shape ({self.n},), got {arr.shape}")
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{what} must hold only 0 and 1")
        arr = arr.astype(np.int8)
        counts = np.bincount(self.groups, weights=arr, minlength=self.num_groups)
        bad = np.flatnonzero(counts != self.k)
        if bad.size:
            g = int(bad[0])
            raise ValueError(
                f"{what} is infeasible: group {g} has {int(counts[g])} ones, needs {self.k[g]}"
                + (f" ({bad.size} groups wrong)" if bad.size > 1 else "")
            )
        return arr

    def is_feasible(self, x: Any) -> bool:
        """True when `x` is 0/1 of length n with exactly k_g ones in every group g."""
        try:
            self.check_state(x)
        except ValueError:
            return False
        return True

    def energy(self, x: Any) -> float:
        """x^T Q x + const (no feasibility check)."""
        xf = np.asarray(x, dtype=np.float64)
        if xf.shape != (self.n,):
            raise ValueError(f"x must have shape ({self.n},), got {xf.shape}")
        return float(xf @ (self.Q @ xf)) + self.const

    def energies(self, X: Any) -> np.ndarray:
        """Energies of many states at once: X is (s, n), result (s,)."""
        Xf = np.asarray(X, dtype=np.float64)
        if Xf.ndim != 2 or Xf.shape[1] != self.n:
            raise ValueError(f"X must have shape (s, {self.n}), got {Xf.shape}")
        return np.einsum("si,si->s", Xf @ self.Q, Xf) + self.const

    def local_fields(self, x: Any) -> np.ndarray:
        """f = Q x: flipping x_i changes E by 2 f_i + Q_ii (0 -> 1) or -(2 f_i - Q_ii) (1 -> 0)."""
        return self.Q @ np.asarray(x, dtype=np.float64)

    def swap_delta(self, x: Any, i: int, j: int) -> float:
        """Energy change of the swap x_i: 1 -> 0, x_j: 0 -> 1 (O(n), for checks)."""
        f = self.local_fields(x)
        Q = self.Q
        return float(-(2 * f[i] - Q[i, i]) + (2 * f[j] + Q[j, j]) - 2 * Q[i, j])

    def magnitude_start(self) -> np.ndarray:
        """Cheap feasible start: in each group, set to 1 the k_g variables with smallest Q_ii.

        For a pruning QUBO Q_ii is the cost of pruning weight i alone, so this is the
        magnitude (or Wanda) mask.
        """
        x = np.zeros(self.n, dtype=np.int8)
        diag = np.diag(self.Q)
        order = np.lexsort((diag, self.groups))  # by group, then by diagonal
        starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1]))
        rank = np.empty(self.n, dtype=np.int64)
        rank[order] = np.arange(self.n) - np.repeat(starts, self.sizes)
        x[rank < self.k[self.groups]] = 1
        return x

    def random_state(self, rng: np.random.Generator) -> np.ndarray:
        """A uniformly random feasible state."""
        x = np.zeros(self.n, dtype=np.int8)
        for g in range(self.num_groups):
            members = np.flatnonzero(self.groups == g)
            x[rng.choice(members, size=int(self.k[g]), replace=False)] = 1
        return x

    def num_feasible(self) -> int:
        """Number of feasible states, prod_g C(|g|, k_g) (exact Python int)."""
        from math import comb

        total = 1
        for size, kg in zip(self.sizes.tolist(), self.k.tolist(), strict=True):
            total *= comb(size, kg)
        return total

    # ------------------------------------------------------------- penalties
    def default_penalty(self) -> float:
        """Penalty strength P = max_i (|Q_ii| + 2 sum_{j != i} |Q_ij|) (at least 1e-12).

        Why it suffices: from a feasible x, a single flip of x_i moves exactly one group
        count off by one, so the penalty P * sum_g (count_g - k_g)^2 grows by exactly P,
        while the objective changes by Q_ii + 2 sum_{j != i} Q_ij x_j (0 -> 1) or its
        negative with x_i removed (1 -> 0), whose size is at most
        |Q_ii| + 2 sum_{j != i} |Q_ij| <= P. Hence every single flip out of a feasible state
        does not lower the penalized energy (strictly raises it unless the bound is tight),
        i.e. feasible states are local minima of the penalty model against single flips.
        """
        absQ_rows = np.zeros(self.n)
        for r0 in range(0, self.n, _CHUNK_ROWS):
            rows = np.abs(self.Q[r0 : r0 + _CHUNK_ROWS])
            absQ_rows[r0 : r0 + rows.shape[0]] = 2 * rows.sum(axis=1)
        bound = absQ_rows - np.abs(np.diag(self.Q))
        return float(max(bound.max(initial=0.0) * (1 + 1e-9), 1e-12))

    def penalty_qubo(self, penalty: float | None = None) -> tuple[np.ndarray, float, float]:
        """(Qp, const_p, P): dense symmetric Q and constant of E + P sum_g (count_g - k_g)^2.

        Expanding P (sum_{i in g} x_i - k_g)^2 with x_i^2 = x_i gives P (1 - 2 k_g) on the
        diagonal of group g, P on each off-diagonal pair (i, j) of the group (both halves of
        the symmetric matrix), and P k_g^2 in the constant.
        """
        P = self.default_penalty() if penalty is None else float(penalty)
        if not np.isfinite(P) or P < 0:
            raise ValueError(f"penalty must be finite and >= 0, got {P}")
        Qp = self.Q.copy()
        same = self.groups[:, None] == self.groups[None, :]
        Qp += P * same
        Qp[np.diag_indices(self.n)] += P * (1 - 2 * self.k[self.groups]) - P
        const = self.const + P * float(np.sum(self.k.astype(np.float64) ** 2))
        return Qp, const, P

    def to_bqm(self, penalty: float | None = None) -> Any:
        """A `dimod.BinaryQuadraticModel` (BINARY, variables 0..n-1) of the penalty model

            x^T Q x + const + P * sum_g (sum_{i in g} x_i - k_g)^2,

        equal to `energy(x)` on every feasible x. P defaults to `default_penalty()`,
        max_i (|Q_ii| + 2 sum_{j != i} |Q_ij|), with which no single flip out of a feasible
        state lowers the penalized energy (proof in `default_penalty`).
        """
        import dimod

        Qp, const, _ = self.penalty_qubo(penalty)
        # the coefficient of x_i x_j (i < j) in the energy is 2 Qp_ij
        row, col = np.nonzero(np.triu(Qp, 1))
        return dimod.BinaryQuadraticModel.from_numpy_vectors(
            np.diag(Qp).copy(), (row, col, 2.0 * Qp[row, col]), const, dimod.BINARY
        )

    def to_ising(self, penalty: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(h, J, offset) of the penalty model in spins s = 2x - 1 (x = 1 <-> s = +1):

            E = sum_i h_i s_i + sum_{i<j} J_ij s_i s_j + offset,

        J strictly upper-triangular (n, n). Equal to `energy(x)` on every feasible x.
        """
        Qp, const, _ = self.penalty_qubo(penalty)
        diag = np.diag(Qp).copy()
        off = Qp - np.diag(diag)
        J = np.triu(off, 1) / 2.0  # coefficient of x_i x_j is 2 Q_ij, so J_ij = Q_ij / 2
        h = diag / 2.0 + off.sum(axis=1) / 2.0
        offset = const + diag.sum() / 2.0 + np.triu(off, 1).sum() / 2.0
        return h, J, float(offset)

    # -------------------------------------------------------------- file I/O
    def save(self, path: str | os.PathLike) -> None:
        """Write Q, k, groups and const to a compressed .npz file (exact round trip)."""
        np.savez_compressed(path, Q=self.Q, k=self.k, groups=self.groups, const=self.const)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CardinalityQUBO:
        """Read a problem written by `save`."""
        with np.load(path) as data:
            missing = {"Q", "k", "groups", "const"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: not a CardinalityQUBO file, missing {sorted(missing)}")
            return cls(data["Q"], data["k"], data["groups"], float(data["const"]), copy=False)

    def write_ubqp(self, path: str | os.PathLike) -> None:
        """Write the objective as UBQP text (the original iCBS annealer's input format).

        First line ``n m``; then m lines ``i j value``, 1-based, i <= j, nonzero entries of the
        upper triangle, where value is the coefficient of x_i x_j in the energy: Q_ii on the
        diagonal and 2 Q_ij off it, so E(x) = sum over lines of value * x_i * x_j.
        Values are written with 17 significant digits (exact round trip). The constraint
        (k, groups) and const are not part of the format: pass them to `read_ubqp`.
        """
        iu, ju = np.triu_indices(self.n)
        vals = self.Q[iu, ju] * np.where(iu == ju, 1.0, 2.0)
        keep = vals != 0
        iu, ju, vals = iu[keep], ju[keep], vals[keep]
        with open(path, "w", encoding="ascii") as fh:
            fh.write(f"{self.n} {vals.size}\n")
            if vals.size:
                lines = np.char.add(
                    np.char.add(np.char.add((iu + 1).astype(str), " "),
                                np.char.add((ju + 1).astype(str), " ")),
                    np.array([repr(float(v)) for v in vals]),
                )
                fh.write("\n".join(lines.tolist()))
                fh.write("\n")

    @classmethod
    def read_ubqp(
        cls, path: str | os.PathLike, k: int | Any, groups: Any = None, const: float = 0.0
    ) -> CardinalityQUBO:
        """Read UBQP text written by `write_ubqp` (or another tool) with the given constraint.

        Repeated (i, j) entries add up; an entry (j, i) with j > i counts as (i, j).
        """
        with open(path, encoding="ascii") as fh:
            header = fh.readline().split()
            if len(header) != 2:
                raise ValueError(f"{path}: first line must be 'n m', got {' '.join(header)!r}")
            try:
                n, m = int(header[0]), int(header[1])
            except ValueError:
                raise ValueError(f"{path}: first line must be two integers 'n m'") from None
            body = np.loadtxt(fh, dtype=np.float64, ndmin=2) if m else np.zeros((0, 3))
        if body.shape != (m, 3) and not (m == 0 and body.size == 0):
            raise ValueError(f"{path}: expected {m} lines 'i j value', got {body.shape[0]}")
        ii = body[:, 0].astype(np.int64) - 1
        jj = body[:, 1].astype(np.int64) - 1
        if m and (ii.min() < 0 or jj.min() < 0 or ii.max() >= n or jj.max() >= n):
            raise ValueError(f"{path}: indices must be in 1..{n}")
        vals = body[:, 2]
        Q = np.zeros((n, n))
        lo, hi = np.minimum(ii, jj), np.maximum(ii, jj)
        diag = lo == hi
        np.add.at(Q, (lo[diag], hi[diag]), vals[diag])
        half = vals[~diag] / 2.0
        np.add.at(Q, (lo[~diag], hi[~diag]), half)
        np.add.at(Q, (hi[~diag], lo[~diag]), half)
        return cls(Q, k, groups, const, copy=False)


class QUBOStack:
    """P cardinality QUBOs of one size n and group count G, stacked (the block QUBOs of many
    rows): Q (P, n, n), float64 and exactly symmetric (the caller guarantees it), k (P, G)
    and groups (P, n) with values 0..G-1, every group non-empty. Checked as a whole, with
    no per-problem Python; `problem(i)` is problem i as a `CardinalityQUBO`."""

    def __init__(self, Q: Any, k: Any, groups: Any) -> None:
        Q = np.ascontiguousarray(Q, dtype=np.float64)
        if Q.ndim != 3 or Q.shape[1] != Q.shape[2]:
            raise ValueError(f"Q must be a (P, n, n) stack of square matrices, got {Q.shape}")
        count, n = Q.shape[:2]
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.isfinite(Q.sum()):  # one pass: NaN or Inf anywhere makes it so
                raise ValueError("Q must be finite (and its sum must not overflow)")
        groups = np.asarray(groups, dtype=np.int64)
        k = np.asarray(k, dtype=np.int64)
        if groups.shape != (count, n) or k.ndim != 2 or len(k) != count:
            raise ValueError(f"groups must be ({count}, {n}) and k ({count}, G), got "
                             f"{groups.shape} and {k.shape}")
        if groups.size and (groups.min() < 0 or groups.max() >= k.shape[1]):
            raise ValueError(f"groups must hold values 0..{k.shape[1] - 1}")
        sizes = (groups[:, :, None] == np.arange(k.shape[1])).sum(1)
        if (sizes == 0).any() or (k < 0).any() or (k > sizes).any():
            raise ValueError("every group must be non-empty with 0 <= k_g <= its size")
        self.Q, self.k, self.groups, self.sizes = Q, k, groups, sizes

    def __len__(self) -> int:
        return len(self.Q)

    def problem(self, i: int) -> CardinalityQUBO:
        return CardinalityQUBO(self.Q[i], self.k[i], self.groups[i], copy=False, symmetric=True)

    def check_states(self, x: Any, what: str = "x") -> np.ndarray:
        """`x` (P, n) as int8 if every row is feasible for its problem, else ValueError."""
        arr = np.asarray(x)
        if arr.shape != self.groups.shape or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{what} must be a {self.groups.shape} array of 0 and 1")
        arr = arr.astype(np.int8)
        counts = ((self.groups[:, :, None] == np.arange(self.k.shape[1])) * arr[:, :, None]).sum(1)
        bad = np.flatnonzero((counts != self.k).any(1))
        if bad.size:
            raise ValueError(f"{what} is infeasible for problem {int(bad[0])} "
                             f"({bad.size} problems wrong)")
        return arr

    def energies(self, x: np.ndarray) -> np.ndarray:
        xf = np.asarray(x, dtype=np.float64)
        return np.einsum("pi,pi->p", np.einsum("pij,pj->pi", self.Q, xf), xf)
