"""`anneal`: simulated annealing with swap moves inside groups (numba), then a swap polish."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from solvers import _kernels as K
from solvers.base import Solver, register
from solvers.problem import CardinalityQUBO

log = logging.getLogger(__name__)


def row_max(problem: CardinalityQUBO) -> np.ndarray:
    """max_{j != i} Q_ij per row, computed once per problem (used to prune the polish)."""
    cached = getattr(problem, "_rowmax", None)
    if cached is None:
        cached = K.row_max_offdiag(problem.Q)
        problem._rowmax = cached
    return cached


def default_betas(
    Q: np.ndarray,
    x: np.ndarray,
    groups: np.ndarray,
    k: np.ndarray,
    sizes: np.ndarray,
    seeds: np.ndarray,
    num_betas: int,
    hot_accept: float = 0.1,
    cold_accept: float = 0.001,
    cold_quantile: float = 0.0,
) -> np.ndarray:
    """Geometric inverse temperatures (P, num_betas) for a stack of P problems, each from
    the scale of its Q at its state x (groups, k, sizes: one row per problem).

    Samples random swaps from x: the hot end accepts a median-size uphill swap with
    probability `hot_accept`; the cold end accepts the `cold_quantile` percentile of the
    nonzero sampled |dE| (default: the smallest) with probability `cold_accept`. Tuned on
    pruning-like instances with low-rank H; with a full-rank H, 100 temperatures are about
    as good as `greedy` and num_betas=1000 is needed to beat it (see the benchmark).

    Why these defaults (pruning-like instances of experiments/bench_solvers.py, seeds 0-4,
    several solver seeds each): a hotter (hot_accept 0.3-0.8) or colder (0.01-0.03) hot end
    changed the mean energy at n = 256 by at most 7%, within the noise. A warmer cold end
    (cold_quantile 5) lowers it at n = 256 by ~15% but gives 17-55% higher energy and costs
    1.4-1.9x the time at n = 1024 and 4096, where good states sit ~100x below the typical |dE|
    at the start; so the cold end stays at the smallest sampled |dE|. Where no swap changes E
    the schedule is all ones.
    """
    median, low = K.swap_delta_scales(Q, x, groups, k, sizes, np.asarray(seeds, np.int64),
                                      cold_quantile)
    betas = np.ones((len(Q), max(num_betas, 1)))
    ok = np.isfinite(median) & np.isfinite(low)
    if num_betas >= 1 and ok.any():
        hot = math.log(1 / hot_accept) / median[ok]
        cold = np.maximum(math.log(1 / cold_accept) / low[ok], hot)
        betas[ok] = np.geomspace(hot, cold, num_betas, axis=1)
    return betas


@register("anneal")
class SwapAnnealer(Solver):
    """Simulated annealing whose move swaps a 1 and a 0 of the same group.

    Parameters
    ----------
    num_betas : number of temperatures of the default geometric schedule.
    sweeps_per_beta : sweeps at each temperature (a sweep = one proposal per movable variable).
    restarts : independent runs from the start state; the best answer is returned.
    betas : explicit inverse temperatures (overrides num_betas and beta_range).
    beta_range : (hot, cold) inverse temperatures for a geometric schedule; default from the
        scale of Q (see `default_betas`).
    polish : end each restart with a best-improvement swap descent, so that no single swap
        improves the returned state.
    start : "magnitude" (smallest Q_ii per group) or "random", used when no x0 is given.
    min_proposals_per_beta : at least this many proposals per temperature, so that small
        problems (where a sweep is only a few proposals) still anneal properly. Default
        1024 (was 512): below n = 1024 a run makes 100 x 1024 proposals, which at n = 256
        lowers the mean energy by 10-17% (seeds 0-4, cold and warm starts) for 0.8-1.1x the
        old per-call time at n = 32-256, the kernel being ~2x faster per proposal than
        before; at n >= 1024 (a sweep is >= 1024 proposals) nothing changes but the speed.
    hot_accept, cold_accept, cold_quantile : shape of the default schedule
        (see `default_betas`; defaults 0.1, 0.001, 0.0).

    Proposals cost O(1) from cached local fields f = Q x, accepted moves O(n) (two rows of
    Q); Q is never copied. info: wall_time, sweeps, restarts, accepted, polish_swaps,
    betas (hot, cold), energies (best per restart).
    """

    def __init__(
        self,
        num_betas: int = 100,
        sweeps_per_beta: int = 1,
        restarts: int = 1,
        betas: Any = None,
        beta_range: tuple[float, float] | None = None,
        polish: bool = True,
        start: str = "magnitude",
        min_proposals_per_beta: int = 1024,
        hot_accept: float = 0.1,
        cold_accept: float = 0.001,
        cold_quantile: float = 0.0,
    ) -> None:
        if num_betas < 1 or sweeps_per_beta < 1 or restarts < 1:
            raise ValueError("num_betas, sweeps_per_beta and restarts must be >= 1")
        if start not in ("magnitude", "random"):
            raise ValueError(f"start must be 'magnitude' or 'random', got {start!r}")
        if betas is not None:
            betas = np.asarray(betas, dtype=np.float64).ravel()
            if betas.size == 0 or not np.all(np.isfinite(betas)) or (betas < 0).any():
                raise ValueError("betas must be a non-empty list of finite values >= 0")
        if beta_range is not None:
            if len(beta_range) != 2 or not (0 < beta_range[0] <= beta_range[1] < np.inf):
                raise ValueError(f"beta_range must be (hot, cold) with 0 < hot <= cold, "
                                 f"got {beta_range}")
        if not (0 < hot_accept < 1 and 0 < cold_accept < 1 and 0 <= cold_quantile <= 100):
            raise ValueError("hot_accept and cold_accept must be in (0, 1), cold_quantile in "
                             "[0, 100]")
        self.num_betas = int(num_betas)
        self.sweeps_per_beta = int(sweeps_per_beta)
        self.restarts = int(restarts)
        self.betas = betas
        self.beta_range = beta_range
        self.polish = bool(polish)
        self.start = start
        self.min_proposals_per_beta = int(min_proposals_per_beta)
        self.hot_accept = float(hot_accept)
        self.cold_accept = float(cold_accept)
        self.cold_quantile = float(cold_quantile)

    def _schedules(self, Q: np.ndarray, x: np.ndarray, groups: np.ndarray, k: np.ndarray,
                   sizes: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """(P, betas) inverse temperatures of P problems (one row of each argument each)."""
        if self.betas is not None:
            betas = self.betas
        elif self.beta_range is not None:
            betas = np.geomspace(self.beta_range[0], self.beta_range[1], self.num_betas)
        else:
            return default_betas(Q, x, groups, k, sizes, seeds,
                                 self.num_betas, hot_accept=self.hot_accept,
                                 cold_accept=self.cold_accept,
                                 cold_quantile=self.cold_quantile)
        return np.tile(betas, (len(Q), 1))

    def _seeds(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """The schedule's seed first, then one per restart: restart r is the same run for any
        `restarts` > r, so more restarts never give a worse answer for the same seed."""
        return int(rng.integers(0, 2**31 - 1)), rng.integers(0, 2**31 - 1, size=self.restarts)

    def _solve(
        self, problem: CardinalityQUBO, x0: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, Any]]:
        schedule_seed, seeds = self._seeds(rng)
        if x0 is not None:
            start = x0
        elif self.start == "magnitude":
            start = problem.magnitude_start()
        else:
            start = problem.random_state(rng)
        betas = self._schedules(problem.Q[None], start[None], problem.groups[None],
                                problem.k[None], problem.sizes[None], np.array([schedule_seed]))[0]
        runs = np.empty((self.restarts, problem.n), dtype=np.int8)
        accepted, polish_swaps, proposals = K.anneal_restarts(
            problem.Q, start.astype(np.int8), problem.groups, problem.k, problem.sizes, betas,
            self.sweeps_per_beta, self.min_proposals_per_beta, seeds, self.polish, runs)
        energies = [problem.energy(x) for x in runs]
        info = {
            "sweeps": int(betas.size * self.sweeps_per_beta),
            "restarts": self.restarts,
            "proposals": int(proposals),
            "accepted": int(accepted),
            "polish_swaps": int(polish_swaps),
            "betas": (float(betas[0]), float(betas[-1])),
            "energies": energies,
        }
        return runs[int(np.argmin(energies))], info

    def solve_stack(self, stack, x0, seeds=None):
        """The stack in one parallel kernel call (numba's threads, `icbs.threads`): the same
        answers as `solve` on each problem."""
        x = stack.check_states(x0, what="warm start x0")
        drawn = [self._seeds(np.random.default_rng(s)) for s in
                 ([None] * len(stack) if seeds is None else seeds)]
        betas = self._schedules(stack.Q, x, stack.groups, stack.k, stack.sizes,
                                np.array([d[0] for d in drawn], dtype=np.int64))
        answers = K.anneal_many(stack.Q, x, stack.groups, stack.k, stack.sizes, betas,
                                self.sweeps_per_beta, self.min_proposals_per_beta,
                                np.stack([d[1] for d in drawn]), self.polish)
        answers = stack.check_states(answers, what="the anneal answer")
        return answers, stack.energies(answers)
