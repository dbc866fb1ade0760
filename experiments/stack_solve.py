"""Solving a stack of block QUBOs: one problem at a time against the solver's stack kernel.

The stacks are those the refit steps hand the solver (`icbs.refit_steps.improve_rows` on a
synthetic layer of SmolLM2's shape, per output 50%, block 64: one QUBO per row of a batch),
captured once and then solved again, side by side, repetition by repetition:

- `loop`: `Solver.solve_many`, one `solve` per problem (how every solver but greedy solved a
  stack before session 12);
- `stack@T`: the solver's own `solve_stack` on T threads (`icbs.threads.set_threads`).

Every configuration must give the same answers (checked). Prints milliseconds per QUBO and
the ratio to `loop`; writes stack_solve_<host>.csv under --out.

    python experiments/stack_solve.py --solvers anneal greedy --threads 1 2
    python experiments/stack_solve.py --threads 1 8 16 --host h200     # a 16-core GPU host
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from refit_throughput import DAMP, synthetic_layer

from icbs.masks import parse_pattern
from icbs.reconstruct import least_squares_update
from icbs.refit_steps import improve_rows
from icbs.report import write_csv
from icbs.threads import set_threads
from solvers import Solver, get_solver


def captured_stacks(rows: int, cols: int, steps_per_row: int) -> list[tuple]:
    """(stack, warm starts, seeds) of every solver call the refit steps make on the layer."""
    w0, h, mask, _, _ = synthetic_layer(rows, cols, "per_output", 0.5, 0, "cpu")
    start = least_squares_update(w0, h, mask, damp=DAMP, start=w0 * mask)
    calls = []

    class Recorder(Solver):
        name = "recorder"

        def solve_stack(self, stack, x0, seeds=None):
            calls.append((stack, np.array(x0), seeds))
            return get_solver("greedy").solve_stack(stack, x0, seeds)

    improve_rows(w0, h, mask, start=start, pattern=parse_pattern("per_output"), block_size=64,
                 solver=Recorder(), seed=0, damp=DAMP, steps=steps_per_row * rows)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solvers", nargs="+", default=["anneal", "greedy"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--shape", default="132x576", help="ROWSxCOLS of the layer")
    parser.add_argument("--steps-per-row", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--host", default="cpu", help="name of the machine, for the CSV")
    parser.add_argument("--out", default="experiments/results/llm")
    args = parser.parse_args()
    set_threads(1)
    rows, cols = (int(v) for v in args.shape.split("x"))
    calls = captured_stacks(rows, cols, args.steps_per_row)
    count = sum(len(stack) for stack, _, _ in calls)
    records = []
    for name in args.solvers:
        solver = get_solver(name)
        solver.warm_up()
        solver.solve_stack(*calls[0])  # compiles the stack kernel outside the timings
        configs = ["loop"] + [f"stack@{t}" for t in args.threads]
        times = {c: [] for c in configs}
        answers = {}
        for _ in range(args.repeats):
            for config in configs:
                set_threads(1 if config == "loop" else int(config.split("@")[1]))
                tic = time.perf_counter()
                if config == "loop":
                    out = [np.stack([r.x for r in solver.solve_many(
                        [stack.problem(i) for i in range(len(stack))], list(x0), seeds)])
                        for stack, x0, seeds in calls]
                else:
                    out = [solver.solve_stack(stack, x0, seeds)[0] for stack, x0, seeds in calls]
                times[config].append((time.perf_counter() - tic) / count * 1e3)
                answers.setdefault(config, out)
                if not all(np.array_equal(a, b) for a, b in zip(answers["loop"], out,
                                                                strict=True)):
                    raise RuntimeError(f"{name} {config}: answers differ from the loop's")
        set_threads(1)
        base = statistics.median(times["loop"])
        for config in configs:
            ms = statistics.median(times[config])
            records.append({"host": args.host, "solver": name, "config": config,
                            "qubos": count, "n": 64, "repeats": args.repeats,
                            "ms_per_qubo": round(ms, 4), "ratio_to_loop": round(base / ms, 2)})
            print(records[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"stack_solve_{args.host}.csv", records)
    print("\n| solver | config | ms per QUBO (median) | speed-up over loop |\n|---|---|---|---|")
    for r in records:
        print(f"| {r['solver']} | {r['config']} | {r['ms_per_qubo']:.3f} | {r['ratio_to_loop']} |")


if __name__ == "__main__":
    main()
