"""What one iCBS block step costs, and how the Fisher estimator's cost scales.

Part 1: the digits demo's own steps (block 256, Fisher, verified on the loss): median time
of estimator + QUBO build, solver, and the whole step, from the run's step records.
Part 2: MLPs 64-h-h-10 for h = 256, 512, 1024 (the middle layer grows 4x each time), the
same calibration samples: time of one block's Fisher estimate, QUBO build and solve at block
256 on the middle layer, with the per-sample signals cached, and the forward/backward pass
that refreshes those signals after an accepted step (that pass does grow with the model).

    python experiments/step_cost.py --out experiments/results
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from icbs import Budget, Pruner, Settings
from icbs.calibration import per_sample_signals
from icbs.digits import load_data, trained_model
from icbs.report import write_csv
from icbs.step import solve_block
from icbs.threads import set_threads


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def demo_steps(data, steps: int) -> dict:
    pruner = Pruner(trained_model(data=data), [(data.x_train, data.y_train)],
                    Settings(sparsity=0.9, block_size=256))
    pruner.run(Budget(steps=steps), progress=False)
    trace = pruner.trace[5:]  # leave out the first steps (numba warm-up)
    return {
        "estimate_ms": 1000 * statistics.median(r.estimate_time for r in trace),
        "solver_ms": 1000 * statistics.median(r.solver_time for r in trace),
        "step_ms": 1000 * statistics.median(b.time - a.time for a, b in zip(trace, trace[1:],
                                                                              strict=False)),
        "accepted": sum(r.accepted for r in trace) / len(trace),
    }


def measure_width(data, h: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                          nn.Linear(h, 10))
    pruner = Pruner(model, [(data.x_train, data.y_train)], Settings(sparsity=0.9, block_size=256))
    index = 1
    layer = pruner.layers[index]
    rng = np.random.default_rng(0)
    blocks = [torch.as_tensor(pruner.selector.choose_block(index, rng)) for _ in range(repeats)]
    pruner.estimator.block(layer, blocks[0])  # fill the signal cache
    it = iter(blocks * 2)
    estimate = median_ms(lambda: pruner.estimator.block(layer, next(it)), repeats)
    it = iter(blocks * 2)
    step = median_ms(lambda: solve_block(layer, next(it), pruner.groups[index],
                                         pruner.estimator, pruner.solver, seed=0), repeats)
    refresh = median_ms(lambda: per_sample_signals(model, pruner.layers, pruner.batches,
                                                   pruner.loss_fn), 5)
    return {"width": h, "layer_weights": layer.numel, "samples": len(data.x_train),
            "block": 256, "estimate_ms": estimate, "estimate_build_solve_ms": step,
            "refresh_ms": refresh}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()
    set_threads(1)
    data = load_data()
    demo = demo_steps(data, 200)
    print("digits demo step (block 256):", demo)
    rows = []
    for h in args.widths:
        rows.append(measure_width(data, h, args.repeats))
        print(rows[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "step_cost.csv", rows)
    write_csv(out / "step_cost_demo.csv", [demo])


if __name__ == "__main__":
    main()
