"""Export the block QUBOs an iCBS run builds, for solver research (`icbs export-qubos`).

A `RecordingSolver` wraps any solver and keeps every problem it is handed, with its warm
start (the current mask of the block), seed and answer. `export_run` runs a `Pruner` with it
and writes each step's problem as

    <tag>_s<step>.npz   `CardinalityQUBO.save` (Q, k, groups, const): load with
                        `CardinalityQUBO.load`;
    <tag>_s<step>.ubqp  UBQP text of the objective (1-based "i j value" lines);

plus one row per step in `index.csv`: layer, flat weight indices of the block, the current
state and the answer as 0/1 strings (1 = pruned), their energies on the exported problem,
the estimated change of the loss of the answer (`delta`), whether the step was accepted,
the solver, its seed and time, and the penalty and repairs of penalty solvers.

The solver sees Q scaled by 1 / max|Q| (see `icbs.block_qubo`), which is what is exported;
the loss model is dL(x) = scale * (E(x) - E(x_current)) with scale = delta / (energy_answer
- energy_current) when the two differ.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from solvers import CardinalityQUBO, Solver, SolveResult

log = logging.getLogger(__name__)

INDEX_FIELDS = [
    "tag", "step", "layer", "n", "groups", "k", "npz", "ubqp", "solver", "seed",
    "energy_current", "energy_answer", "delta", "accepted", "solver_time", "penalty",
    "num_samples", "num_infeasible", "repair_flips", "block", "x_current", "x_answer",
]


@dataclass
class SolveCall:
    """One call of a solver: the problem, the warm start x0, the seed and the answer."""

    problem: CardinalityQUBO
    x0: np.ndarray | None
    seed: int | None
    result: SolveResult


class RecordingSolver(Solver):
    """A solver that passes every call to `inner` and keeps it in `calls` (same answers,
    same `name` and `max_variables`, so the block size cap still applies)."""

    def __init__(self, inner: Solver) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_variables = inner.max_variables
        self.calls: list[SolveCall] = []

    def solve(self, problem: CardinalityQUBO, x0: np.ndarray | None = None,
              seed: int | None = None) -> SolveResult:
        result = self.inner.solve(problem, x0=x0, seed=seed)
        x0 = None if x0 is None else np.array(x0, dtype=np.int8)
        self.calls.append(SolveCall(problem, x0, seed, result))
        return result


def bits(x: np.ndarray | None) -> str:
    """A 0/1 vector as a string of '0' and '1' ('' for None)."""
    return "" if x is None else "".join(map(str, np.asarray(x, dtype=np.int8).tolist()))


def from_bits(text: str) -> np.ndarray:
    """Inverse of `bits`."""
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int8) - ord("0")


class IndexWriter:
    """Writes problem files and rows of a new `index.csv` under `out` as steps arrive."""

    def __init__(self, out: str | Path, ubqp: bool = True) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ubqp = ubqp
        self.path = self.out / "index.csv"
        self._fh = open(self.path, "w", newline="", encoding="utf-8")  # a fresh index
        self._csv = csv.DictWriter(self._fh, fieldnames=INDEX_FIELDS)
        self._csv.writeheader()
        self.rows = 0

    def write(self, tag: str, call: SolveCall, *, step: int, layer: str = "",
              block: np.ndarray | None = None, delta: float = float("nan"),
              accepted: bool = False, solver: str = "") -> dict[str, Any]:
        """Write one block problem and its index row; returns the row."""
        stem = f"{tag}_s{step:05d}"
        problem, info = call.problem, call.result.info
        problem.save(self.out / f"{stem}.npz")
        if self.ubqp:
            problem.write_ubqp(self.out / f"{stem}.ubqp")
        row = {
            "tag": tag, "step": step, "layer": layer, "n": problem.n,
            "groups": problem.num_groups, "k": " ".join(map(str, problem.k.tolist())),
            "npz": f"{stem}.npz", "ubqp": f"{stem}.ubqp" if self.ubqp else "",
            "solver": solver, "seed": "" if call.seed is None else call.seed,
            "energy_current": "" if call.x0 is None else repr(problem.energy(call.x0)),
            "energy_answer": repr(call.result.energy), "delta": repr(float(delta)),
            "accepted": int(bool(accepted)), "solver_time": info.get("wall_time", ""),
            "penalty": info.get("penalty", ""), "num_samples": info.get("num_samples", ""),
            "num_infeasible": info.get("num_infeasible", ""),
            "repair_flips": info.get("repair_flips", ""),
            "block": "" if block is None else " ".join(map(str, np.asarray(block).tolist())),
            "x_current": bits(call.x0), "x_answer": bits(call.result.x),
        }
        self._csv.writerow(row)
        self._fh.flush()
        self.rows += 1
        return row

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export_run(pruner: Any, steps: int, writer: IndexWriter, tag: str,
               progress: bool = False) -> list[dict[str, Any]]:
    """Run `pruner` (an `icbs.Pruner`) for `steps` more steps and write every block problem
    its solver is handed, paired with the step's record (layer, block, delta, accepted)."""
    from icbs.budget import Budget

    recorder = RecordingSolver(pruner.solver)
    pruner.solver = recorder
    rows: list[dict[str, Any]] = []

    def on_step(p: Any, record: Any) -> None:
        if not recorder.calls:  # the block had fewer than two free weights: nothing solved
            return
        call = recorder.calls.pop()
        assert not recorder.calls, "one solver call per step"
        rows.append(writer.write(tag, call, step=record.step, layer=record.layer,
                                 block=p.last_block, delta=record.delta,
                                 accepted=record.accepted, solver=recorder.name))

    try:
        pruner.run(Budget(steps=len(pruner.trace) + steps), callback=on_step, progress=progress)
    finally:
        pruner.solver = recorder.inner
    return rows


@dataclass
class ExportedBlock:
    """One exported problem with its index row (states as int8 arrays)."""

    problem: CardinalityQUBO
    x_current: np.ndarray | None
    x_answer: np.ndarray
    row: dict[str, str]


def load_exported(out: str | Path) -> Iterator[ExportedBlock]:
    """Yield the problems listed in `out/index.csv`, loaded from their npz files."""
    out = Path(out)
    with open(out / "index.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            problem = CardinalityQUBO.load(out / row["npz"])
            x_current = from_bits(row["x_current"]) if row["x_current"] else None
            yield ExportedBlock(problem, x_current, from_bits(row["x_answer"]), row)


def export_digits(out: str | Path, *, block_sizes: list[int], steps: int, sparsity: float = 0.9,
                  pattern: str = "unstructured", objective: str = "fisher",
                  solver: Any = "anneal", seed: int = 0, ubqp: bool = True,
                  progress: bool = False) -> list[dict[str, Any]]:
    """Prune the bundled digits MLP from its magnitude mask, `steps` iCBS steps per block
    size (each from a fresh copy), and export every block problem under `out`."""
    from icbs.digits import load_data, trained_model
    from icbs.pruner import Pruner
    from icbs.settings import Settings
    from icbs.solver_choice import resolve_solver, solver_label

    # every block size's settings are checked before an existing index is replaced
    all_settings = [Settings(sparsity=sparsity, pattern=pattern, objective=objective,
                             block_size=size, seed=seed, solver=solver_label(solver))
                    for size in block_sizes]
    resolve_solver(solver)
    data = load_data()
    dense = trained_model(data=data)
    rows: list[dict[str, Any]] = []
    with IndexWriter(out, ubqp=ubqp) as writer:
        for settings in all_settings:
            model = copy.deepcopy(dense)
            pruner = Pruner(model, [(data.x_train, data.y_train)], settings, solver=solver)
            tag = f"digits_b{pruner.block_size}"
            rows += export_run(pruner, steps, writer, tag, progress=progress)
            pruner.finish()
            log.info("%s: %d problems", tag, sum(r["tag"] == tag for r in rows))
    return rows


def add_export_command(subparsers: Any) -> None:
    """Register `icbs export-qubos` on the CLI."""
    p = subparsers.add_parser(
        "export-qubos", help="run iCBS on the bundled digits MLP and write its block QUBOs",
        description="Run iCBS steps on the bundled digits MLP (64-256-128-10) for each block "
                    "size and write every block problem as .npz (CardinalityQUBO.save) and "
                    ".ubqp files plus index.csv (layer, block indices, current state, answer, "
                    "estimated dL, accepted). For other models use icbs.export.export_run.")
    p.add_argument("--block-size", type=int, nargs="+", default=[32, 64, 120, 256],
                   help="block sizes, one run each (default 32 64 120 256)")
    p.add_argument("--steps", type=int, default=10, help="steps per block size (default 10)")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction pruned (default 0.9)")
    p.add_argument("--pattern", default="unstructured",
                   help="unstructured, per_output or N:M (default unstructured)")
    p.add_argument("--objective", default="fisher", help="fisher, layerwise or exact")
    p.add_argument("--solver", default="anneal",
                   help="solver of the run: a name or dimod:<module>:<class> (default anneal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ubqp", action="store_true", help="write only the .npz files")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> None:
    from icbs.checks import flag_at_least, output_directory
    from icbs.threads import set_threads

    flag_at_least("--steps", args.steps, 1)
    flag_at_least("--threads", args.threads, 1)
    output_directory("--out", args.out)
    set_threads(args.threads)
    rows = export_digits(args.out, block_sizes=args.block_size, steps=args.steps,
                         sparsity=args.sparsity, pattern=args.pattern,
                         objective=args.objective, solver=args.solver, seed=args.seed,
                         ubqp=not args.no_ubqp, progress=sys.stderr.isatty())
    print(f"wrote {len(rows)} block problems and index.csv to {args.out}")
