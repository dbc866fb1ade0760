"""Quality-time trade-off of iCBS on the bundled digits MLP, against one-shot baselines.

For each sparsity and seed, one iCBS run of the longest budget records test accuracy and
loss after every step; the state after t CPU-seconds is what a run with budget t returns
(steps never depend on the budget), so every budget is read off that one run.

    python experiments/quality_time_digits.py --out experiments/results

writes quality_time_digits.csv and quality_time_digits.png.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from icbs import Budget, Settings
from icbs.demo import one_shot, run_icbs
from icbs.digits import evaluate, load_data, trained_model
from icbs.report import write_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 5, 10, 20, 30],
                        help="CPU seconds at which to report (the longest is run)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = load_data()
    dense = trained_model(data=data)
    dense_acc, dense_loss = evaluate(dense, data.x_test, data.y_test)
    rows = [dict(sparsity=0.0, seed=0, method="dense", budget_cpu_s=0, cpu_s=0, wall_s=0,
                 test_acc=dense_acc, test_loss=dense_loss, steps=0)]
    curves = {}
    for sparsity in args.sparsities:
        for seed in args.seeds:
            common = dict(sparsity=sparsity, seed=seed, block_size=args.block_size)
            for init in ("magnitude", "wanda"):
                r = one_shot(dense, data, Settings(init=init, **common))
                rows.append(dict(sparsity=sparsity, seed=seed, method=init, budget_cpu_s=0,
                                 cpu_s=r.seconds, wall_s=r.seconds, test_acc=r.accuracy,
                                 test_loss=r.loss, steps=0))
            settings = Settings(init="magnitude", objective="fisher", **common)
            result, _ = run_icbs(dense, data, settings, Budget(seconds=20 * max(args.budgets)),
                                 progress=False, cpu_seconds=max(args.budgets))
            curves[sparsity, seed] = result.curve
            for budget in args.budgets:
                step = max(i for i, c in enumerate(result.curve) if c[1] <= budget)
                wall, cpu, acc, loss = result.curve[step]
                rows.append(dict(sparsity=sparsity, seed=seed, method="icbs",
                                 budget_cpu_s=budget, cpu_s=cpu, wall_s=wall, test_acc=acc,
                                 test_loss=loss, steps=step))
            print(f"sparsity {sparsity} seed {seed}: " + ", ".join(
                f"{r['budget_cpu_s']:g}s {100 * r['test_acc']:.1f}%" for r in rows
                if r["method"] == "icbs" and r["sparsity"] == sparsity and r["seed"] == seed))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "quality_time_digits.csv", rows)
    print(summary_table(rows, args.budgets))
    plot(rows, curves, args, out / "quality_time_digits.png", dense_acc)


def summary_table(rows: list[dict], budgets: list[float]) -> str:
    """Markdown table: median test accuracy over seeds per sparsity and method/budget."""
    sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] > 0})
    header = ["sparsity", "magnitude", "Wanda"] + [f"iCBS {b:g} s" for b in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def med(s, method, budget=0):
        return statistics.median(r["test_acc"] for r in rows if r["sparsity"] == s
                                 and r["method"] == method and r["budget_cpu_s"] == budget)

    for s in sparsities:
        cells = [f"{100 * s:.0f}%", f"{100 * med(s, 'magnitude'):.1f}",
                 f"{100 * med(s, 'wanda'):.1f}"]
        cells += [f"{100 * med(s, 'icbs', b):.1f}" for b in budgets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, curves, args, path: Path, dense_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.sparsities), figsize=(4.2 * len(args.sparsities), 3.8),
                             sharey=True, squeeze=False)
    for ax, sparsity in zip(axes[0], args.sparsities, strict=True):
        for seed in args.seeds:
            curve = [c for c in curves[sparsity, seed] if c[1] <= max(args.budgets)]
            ax.plot([c[1] for c in curve], [100 * c[2] for c in curve], "C0-", alpha=0.6,
                    lw=1, label="iCBS (per seed)" if seed == args.seeds[0] else None)
        for method, color in (("magnitude", "C1"), ("wanda", "C2")):
            acc = statistics.median(r["test_acc"] for r in rows
                                    if r["sparsity"] == sparsity and r["method"] == method)
            ax.axhline(100 * acc, color=color, ls="--", label=f"{method} one-shot")
        ax.axhline(100 * dense_acc, color="k", ls=":", label="dense")
        ax.set_title(f"{100 * sparsity:.0f}% sparsity")
        ax.set_xlabel("pruning time (CPU s)")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, max(args.budgets))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("iCBS on the digits MLP (64-256-128-10), all layers pruned")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
