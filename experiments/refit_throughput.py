"""Throughput of the refit steps: row steps per second of `improve_rows` by solver and batch
size, side by side in one run (the configurations alternate, repetition by repetition), on
synthetic layers of SmolLM2-135M's shapes (per output, 50% by default), block 64. With
`--seconds S` each run gets a time budget instead of a step count, and the damped error
reached says which configuration uses the time best. `--block-choices best_first random`
and `--min-steps 1 4` compare how blocks are chosen and how thin a budget is spread;
`--threads 1 2` the CPU threads of torch and of the solvers' stack kernels.

A batch holds as many rows as fit in `--batch-elements` entries of stacked inverses
(`icbs.refit_steps.BATCH_ELEMENTS`, 2**22, is the default: 33 rows of a 576-column layer
at 50%); on a GPU larger batches should pay, which this measures:

    python experiments/refit_throughput.py --device cpu --out experiments/results/llm
    python experiments/refit_throughput.py --device cuda --batch-elements 4194304 67108864 \
        268435456 --out experiments/results/llm/h200

Writes refit_throughput_<device>.csv (one row per run) and prints the median row steps per
second of each configuration with its ratio to the first one.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import time
from pathlib import Path

import torch

from icbs.masks import mask_from_scores, parse_pattern
from icbs.reconstruct import least_squares_update, reconstruction_error
from icbs.refit_steps import BATCH_ELEMENTS, improve_rows, rows_per_batch
from icbs.report import write_csv
from icbs.solver_choice import resolve_solver
from icbs.threads import set_threads

DAMP = 0.01


def synthetic_layer(rows: int, cols: int, pattern: str, sparsity: float, seed: int,
                    device: str):
    """(w0, H, start mask, damped H, the damped error of the start's refit): correlated
    inputs, so that H is far from diagonal."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen) / cols ** 0.5
    x = torch.randn(4 * cols, cols, generator=gen) @ mix
    h = x.T @ x / len(x)
    w0 = torch.randn(rows, cols, generator=gen)
    mask = mask_from_scores(w0.abs() * torch.diagonal(h).sqrt(), sparsity, pattern)
    damped = h.double() + DAMP * torch.diagonal(h).mean().double() * torch.eye(
        cols, dtype=torch.float64)
    refit = least_squares_update(w0, h, mask, damp=DAMP, start=w0 * mask)
    start_error = float(reconstruction_error(w0.double(), refit.double(), damped).sum())
    return (w0.to(device), h.to(device), mask.to(device), damped.to(device), start_error)


def run_once(layer, pattern: str, solver, batch_elements: int, steps_per_row: int,
             seconds: float | None, device: str, block_choice: str = "best_first",
             min_steps: int = 1) -> dict:
    w0, h, mask, damped, start_error = layer
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    begin = time.perf_counter()
    budget = dict(seconds=seconds) if seconds else dict(
        steps=len(w0) * steps_per_row, patience=steps_per_row + 1)
    result = improve_rows(w0, h, mask, start=w0 * mask, pattern=parse_pattern(pattern),
                          block_size=64, solver=solver, seed=0, damp=DAMP,
                          batch_elements=batch_elements, block_choice=block_choice,
                          min_steps=min_steps, **budget)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - begin
    error = float(reconstruction_error(w0.double(), result.weight.double(), damped).sum())
    return {"row_steps": result.steps, "accepted": result.accepted,
            "rows_visited": result.rows_visited, "damped_error_start_refit": start_error,
            "seconds": round(wall, 3), "row_steps_per_s": round(result.steps / wall, 1),
            "damped_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=["576x576", "576x1536"],
                        help="ROWSxCOLS of the layers (SmolLM2: q/o 576x576, gate/up "
                             "1536x576, down 576x1536)")
    parser.add_argument("--solvers", nargs="+", default=["greedy", "anneal"])
    parser.add_argument("--batch-elements", nargs="+", type=int,
                        default=[BATCH_ELEMENTS, 4 * BATCH_ELEMENTS])
    parser.add_argument("--pattern", default="per_output")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps-per-row", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=None,
                        help="a time budget per run instead of --steps-per-row")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--block-choices", nargs="+", default=["best_first"],
                        choices=["best_first", "random"])
    parser.add_argument("--min-steps", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", nargs="+", type=int, default=[1],
                        help="CPU threads of torch and of the solvers' stack kernels")
    parser.add_argument("--out", default="experiments/results/llm")
    args = parser.parse_args()
    solvers = {name: resolve_solver(name) for name in args.solvers}
    small = synthetic_layer(8, 128, args.pattern, args.sparsity, 1, args.device)
    for solver in solvers.values():  # JIT compilation and CUDA start-up outside the timings
        run_once(small, args.pattern, solver, BATCH_ELEMENTS, 2, None, args.device)

    configs = list(itertools.product(args.solvers, args.batch_elements, args.block_choices,
                                     args.min_steps, args.threads))
    records = []
    for shape in args.shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        layer = synthetic_layer(rows, cols, args.pattern, args.sparsity, 0, args.device)
        for repeat in range(args.repeats):
            for name, batch_elements, block_choice, min_steps, threads in configs:
                set_threads(threads)
                record = {"device": args.device, "shape": shape, "pattern": args.pattern,
                          "sparsity": args.sparsity, "seconds_budget": args.seconds,
                          "steps_per_row": None if args.seconds else args.steps_per_row,
                          "solver": name, "batch_elements": batch_elements,
                          "batch_rows": rows_per_batch(int(layer[2][0].sum()), 64,
                                                       batch_elements),
                          "block_choice": block_choice, "min_steps": min_steps,
                          "threads": threads, "repeat": repeat}
                record.update(run_once(layer, args.pattern, solvers[name], batch_elements,
                                       args.steps_per_row, args.seconds, args.device,
                                       block_choice, min_steps))
                records.append(record)
                print(record, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"refit_throughput_{args.device.replace(':', '')}.csv"
    earlier = list(csv.DictReader(path.open())) if path.exists() else []
    # one file per device; runs of other settings add up (a column that older rows lack,
    # such as `threads` before session 12, is left empty in them)
    write_csv(path, [{key: row.get(key, "") for key in records[0]} for row in earlier] + records)

    print("\n| shape | solver | batch elements (rows) | block choice | min steps | threads | "
          "row steps/s (median) | ratio | damped error: start's refit -> after (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        runs = {c: [r for r in records if r["shape"] == shape and (
            r["solver"], r["batch_elements"], r["block_choice"], r["min_steps"],
            r["threads"]) == c]
            for c in configs}
        rate = {c: statistics.median(r["row_steps_per_s"] for r in runs[c]) for c in configs}
        for c in configs:
            error = statistics.median(r["damped_error"] for r in runs[c])
            print(f"| {shape} | {c[0]} | {c[1]} ({runs[c][0]['batch_rows']}) | {c[2]} | {c[3]} | "
                  f"{c[4]} | {rate[c]:.0f} | {rate[c] / rate[configs[0]]:.2f} | "
                  f"{runs[c][0]['damped_error_start_refit']:.1f} -> {error:.1f} |")


if __name__ == "__main__":
    main()
