"""Penalty solvers: `neal` (dwave-neal) and `dimod` (any dimod.Sampler), answers repaired.

The sampler sees the BQM of `CardinalityQUBO.to_bqm(penalty)`. Each returned sample whose
group counts differ from k is repaired by greedy flips (`repair`); the best repaired sample
by the true energy is returned. info records the penalty strength used and how many samples
were infeasible.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from solvers import _kernels as K
from solvers.anneal import row_max
from solvers.base import Solver
from solvers.base import register as _register
from solvers.problem import CardinalityQUBO

log = logging.getLogger(__name__)


def repair(problem: CardinalityQUBO, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Make x feasible by greedy flips: in each group with too many ones flip to 0 the one
    whose removal lowers E most, with too few flip to 1 the cheapest zero, until the count
    is k_g. Returns (feasible int8 x, number of flips)."""
    x = np.asarray(x, dtype=np.int8).copy()
    counts = np.bincount(problem.groups, weights=x, minlength=problem.num_groups).astype(np.int64)
    if np.array_equal(counts, problem.k):
        return x, 0
    f = K.fields(problem.Q, x)
    flips = K.repair_counts(problem.Q, x, f, problem.groups, problem.k, counts)
    return x, int(flips)


class PenaltySolver(Solver):
    """Shared logic: build the penalty BQM, sample, repair, pick the best (optionally polish)."""

    def __init__(self, penalty: float | None = None, polish: bool = False,
                 max_variables: int | None = None, **sample_kwargs: Any) -> None:
        if penalty is not None and not (np.isfinite(penalty) and penalty >= 0):
            raise ValueError(f"penalty must be finite and >= 0, got {penalty}")
        if max_variables is not None and max_variables < 1:
            raise ValueError(f"max_variables must be >= 1, got {max_variables}")
        self.penalty = penalty
        self.polish = bool(polish)
        self.max_variables = max_variables
        self.sample_kwargs = sample_kwargs

    def _sampler(self) -> Any:
        raise NotImplementedError

    def _sample(self, sampler: Any, bqm: Any, x0: np.ndarray | None,
                rng: np.random.Generator) -> Any:
        return sampler.sample(bqm, **self.sample_kwargs)

    def _solve(
        self, problem: CardinalityQUBO, x0: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, Any]]:
        bqm = problem.to_bqm(self.penalty)
        P = problem.default_penalty() if self.penalty is None else float(self.penalty)
        sampleset = self._sample(self._sampler(), bqm, x0, rng)
        order = list(range(problem.n))
        samples = np.asarray(sampleset.record.sample, dtype=np.int8)
        if problem.n:
            cols = [sampleset.variables.index(v) for v in order]
            samples = samples[:, cols]
        if sampleset.vartype.name == "SPIN":
            samples = ((samples + 1) // 2).astype(np.int8)
        infeasible, flips = 0, 0
        best_x, best_e = None, np.inf
        for s in samples:
            xr, fl = repair(problem, s)
            infeasible += fl > 0
            flips += fl
            e = problem.energy(xr)
            if e < best_e:
                best_x, best_e = xr, e
        polish_swaps = 0
        if self.polish:
            f = K.fields(problem.Q, best_x)
            perm, gstart, _ = K.layout(best_x, problem.groups, problem.k, problem.sizes)
            diag = np.ascontiguousarray(np.diag(problem.Q))
            _, polish_swaps, _ = K.polish_sweep(problem.Q, diag, best_x, f, perm, gstart, problem.k,
                                                problem.sizes, row_max(problem),
                                                np.iinfo(np.int64).max)
        info = {
            "penalty": P,
            "num_samples": int(samples.shape[0]),
            "num_infeasible": int(infeasible),
            "num_repaired": int(infeasible),
            "repair_flips": int(flips),
            "polish_swaps": int(polish_swaps),
            "restarts": int(samples.shape[0]),
            "sampler_info": dict(sampleset.info),
        }
        return best_x, info


@_register("neal")
class NealSolver(PenaltySolver):
    """dwave-neal simulated annealing on the penalty BQM, answers repaired to the exact counts.

    Parameters
    ----------
    num_reads : independent anneals (default 10).
    num_sweeps : sweeps per anneal (default 1000).
    penalty : penalty strength (default `CardinalityQUBO.default_penalty()`).
    polish : swap-polish the best repaired answer (default False: neal's answer as is).
    Other keywords go to `neal.SimulatedAnnealingSampler.sample` (e.g. beta_range).
    A warm start x0 becomes the initial state of every read.

    info: wall_time, sweeps, restarts (= reads), penalty, num_infeasible / num_repaired
    (samples that broke a count), repair_flips.
    """

    def __init__(self, num_reads: int = 10, num_sweeps: int = 1000,
                 penalty: float | None = None, polish: bool = False, **sample_kwargs: Any):
        super().__init__(penalty=penalty, polish=polish, num_reads=int(num_reads),
                         num_sweeps=int(num_sweeps), **sample_kwargs)

    def _sampler(self) -> Any:
        import neal

        return neal.SimulatedAnnealingSampler()

    def _sample(self, sampler: Any, bqm: Any, x0: np.ndarray | None,
                rng: np.random.Generator) -> Any:
        kwargs = dict(self.sample_kwargs)
        kwargs.setdefault("seed", int(rng.integers(0, 2**31 - 1)))
        if x0 is not None:
            reads = kwargs.get("num_reads", 1)
            kwargs["initial_states"] = (np.tile(x0, (reads, 1)), list(range(len(x0))))
        return sampler.sample(bqm, **kwargs)

    def _solve(self, problem, x0, rng):
        x, info = super()._solve(problem, x0, rng)
        info["sweeps"] = self.sample_kwargs["num_sweeps"]
        return x, info


def declared_max_variables(sampler: Any) -> int | None:
    """The most variables a dense problem may have on `sampler`, as the sampler declares it:
    ``properties["max_variables"]``, a ``largest_clique_size`` (D-Wave's clique sampler), or
    the number of nodes of a structured sampler; None when it declares nothing."""
    props = getattr(sampler, "properties", None) or {}
    for value in (props.get("max_variables"), props.get("largest_clique_size"),
                  getattr(sampler, "largest_clique_size", None)):
        if isinstance(value, (int, np.integer)) and value >= 1:
            return int(value)
    nodelist = getattr(sampler, "nodelist", None)
    return len(nodelist) if nodelist else None


@_register("dimod")
class DimodSolver(PenaltySolver):
    """Any `dimod.Sampler` (a D-Wave QPU via EmbeddingComposite, a hybrid solver, a
    third-party annealer) on the penalty BQM, answers repaired to the exact counts.

    Parameters
    ----------
    sampler : the dimod.Sampler instance (required; any object with dimod's `sample(bqm)`
        returning a SampleSet works).
    max_variables : refuse larger problems with a clear error (a dense block embeds on
        today's annealing QPUs only up to about 120-180 variables); default: what the sampler
        declares (`declared_max_variables`), else no limit. The iCBS loop caps its block
        size at this number.
    penalty, polish : as for `neal`.
    Other keywords go to `sampler.sample` (e.g. num_reads). A `seed` keyword is passed only
    if the sampler declares it in `parameters`; x0 is not used (most samplers cannot take it).

    info: wall_time, restarts (= samples), penalty, num_infeasible / num_repaired,
    repair_flips, sampler_info.
    """

    def __init__(self, sampler: Any = None, max_variables: int | None = None,
                 penalty: float | None = None, polish: bool = False, **sample_kwargs: Any):
        if sampler is None or not callable(getattr(sampler, "sample", None)):
            raise ValueError(f"'dimod' needs sampler=<a dimod.Sampler instance>, got {sampler!r}")
        if max_variables is None:
            max_variables = declared_max_variables(sampler)
        super().__init__(penalty=penalty, polish=polish, max_variables=max_variables,
                         **sample_kwargs)
        self.sampler = sampler

    def warm_up(self) -> None:
        """Nothing: a call to an external sampler (a QPU, say) may cost real time or money."""

    def _sampler(self) -> Any:
        return self.sampler

    def _sample(self, sampler: Any, bqm: Any, x0: np.ndarray | None,
                rng: np.random.Generator) -> Any:
        kwargs = dict(self.sample_kwargs)
        if "seed" in getattr(sampler, "parameters", {}) and "seed" not in kwargs:
            kwargs["seed"] = int(rng.integers(0, 2**31 - 1))
        return sampler.sample(bqm, **kwargs)
