"""`icbs demo`: prune the bundled digits MLP with magnitude, Wanda and iCBS, side by side."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icbs.budget import Budget
from icbs.digits import DigitsData, evaluate, load_data, trained_model
from icbs.pruner import Pruner
from icbs.report import write_atomic
from icbs.settings import Settings
from icbs.solver_choice import solver_label


@dataclass
class MethodResult:
    method: str
    accuracy: float
    loss: float
    seconds: float
    # (wall s, CPU s, test accuracy, test loss) after each step, from the start of pruning
    curve: list[tuple[float, float, float, float]] = field(default_factory=list)


def one_shot(dense: torch.nn.Module, data: DigitsData, settings: Settings) -> MethodResult:
    """Prune a copy of `dense` with the settings' initial mask only."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    Pruner(model, [(data.x_train, data.y_train)], settings).finish()
    seconds = time.perf_counter() - start
    return MethodResult(settings.init, *evaluate(model, data.x_test, data.y_test), seconds)


def run_icbs(dense: torch.nn.Module, data: DigitsData, settings: Settings, budget: Budget,
             progress: bool = False, solver: Any = None,
             cpu_seconds: float | None = None) -> tuple[MethodResult, dict]:
    """iCBS from the settings' initial mask, stopping at `budget` or after `cpu_seconds` of
    CPU time. Test accuracy and loss are recorded after every step for the quality-time
    curve; the time spent evaluating is left out of its clocks.
    `solver` (a name, "dimod:<module>:<class>", a Solver or a dimod sampler) overrides
    `settings.solver`."""
    model = copy.deepcopy(dense)
    cpu0 = time.process_time()
    pruner = Pruner(model, [(data.x_train, data.y_train)], settings, solver=solver)
    eval_cpu = 0.0
    curve = []

    def record(p: Pruner, _record=None) -> None:
        nonlocal eval_cpu
        cpu = time.process_time()
        curve.append((p.init_seconds + p.elapsed, cpu - cpu0 - eval_cpu,
                      *evaluate(model, data.x_test, data.y_test)))
        eval_cpu += time.process_time() - cpu
        if cpu_seconds is not None and curve[-1][1] >= cpu_seconds:
            p.stop()

    record(pruner)
    report = pruner.run(budget, callback=record, progress=progress)
    pruner.finish()
    acc, loss = evaluate(model, data.x_test, data.y_test)
    seconds = report.timings["init_seconds"] + report.timings["run_seconds"]
    return MethodResult("icbs", acc, loss, seconds, curve), report.to_dict()


def run_demo(
    sparsity: float = 0.9,
    seconds: float = 60.0,
    *,
    seed: int = 0,
    block_size: int = 256,
    pattern: str = "unstructured",
    out: str | Path = "icbs-demo",
    progress: bool = False,
    solver: Any = "anneal",
) -> list[MethodResult]:
    """Run the demo, write `report.json` and `accuracy.png` under `out`, return the results."""
    Settings(sparsity=sparsity, pattern=pattern, block_size=block_size)  # bad input: fail now
    if not seconds > 0:
        raise ValueError(f"the budget must be a positive number of seconds, got {seconds!r}")
    data = load_data()
    dense = trained_model(data=data)
    dense_acc, dense_loss = evaluate(dense, data.x_test, data.y_test)
    common = dict(sparsity=sparsity, pattern=pattern, seed=seed, block_size=block_size)
    results = [MethodResult("dense", dense_acc, dense_loss, 0.0)]
    results += [one_shot(dense, data, Settings(init=init, **common))
                for init in ("magnitude", "wanda")]
    settings = Settings(init="magnitude", objective="fisher",
                        solver=solver_label(solver),
                        **common)
    icbs_result, report = run_icbs(dense, data, settings, Budget(seconds=seconds), progress,
                                   solver=solver)
    results.append(icbs_result)

    out = Path(out)
    summary = {
        "task": "digits MLP 64-256-128-10, all linear layers pruned",
        "sparsity": sparsity, "pattern": pattern, "budget_seconds": seconds,
        "results": [vars(r) for r in results], "icbs_report": report,
    }
    write_atomic(out / "report.json", json.dumps(summary, indent=1).encode())
    plot_curve(results, out / "accuracy.png", sparsity)
    return results


def plot_curve(results: list[MethodResult], path: Path, sparsity: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"dense": ("k", ":"), "magnitude": ("C1", "--"), "wanda": ("C2", "-.")}
    for r in results:
        label = f"{r.method} ({100 * r.accuracy:.1f}%)"
        if r.curve:
            ax.plot([c[0] for c in r.curve], [100 * c[2] for c in r.curve], "C0-",
                    label=f"iCBS from magnitude ({100 * r.accuracy:.1f}%)")
        else:
            color, style = styles[r.method]
            ax.axhline(100 * r.accuracy, color=color, ls=style, label=label)
    ax.set_xlabel("pruning time (s, wall)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits MLP at {100 * sparsity:.0f}% sparsity")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: list[MethodResult]) -> str:
    lines = [f"{'method':<10} {'test acc':>9} {'test loss':>10} {'time (s)':>9}"]
    for r in results:
        lines.append(f"{r.method:<10} {100 * r.accuracy:>8.1f}% {r.loss:>10.3f} {r.seconds:>9.1f}")
    return "\n".join(lines)
