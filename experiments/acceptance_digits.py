"""What accepting Fisher steps on the estimate alone does to the test curve, against
verifying each step on the calibration loss (the default), on the digits MLP.

    python experiments/acceptance_digits.py --out experiments/results

writes acceptance_digits.csv (one row per run: final and worst test accuracy after the
first seconds, largest drop from the running best, number of step-to-step drops of 2
points or more) and acceptance_digits.png (the curves).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from icbs import Budget, Settings
from icbs.demo import run_icbs
from icbs.digits import load_data, trained_model
from icbs.report import write_csv
from icbs.threads import set_threads


def curve_stats(curve: list[tuple], settle: float) -> dict:
    acc = [c[2] for c in curve]
    late = [c[2] for c in curve if c[0] >= settle]
    best, drawdown = 0.0, 0.0
    for a in acc:
        best = max(best, a)
        drawdown = max(drawdown, best - a)
    drops = sum(b < a - 0.02 for a, b in zip(acc, acc[1:], strict=False))
    return {"final_acc": acc[-1], "min_acc_after_settle": min(late),
            "max_acc_after_settle": max(late), "max_drawdown": drawdown, "drops_2pt": drops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after which the curve's minimum is reported")
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()
    set_threads(1)
    data = load_data()
    dense = trained_model(data=data)
    rows, curves = [], {}
    for verify in ("estimate", "loss"):
        for seed in args.seeds:
            settings = Settings(sparsity=args.sparsity, seed=seed, objective="fisher",
                                verify=verify)
            result, report = run_icbs(dense, data, settings, Budget(seconds=args.seconds),
                                      progress=False)
            curves[verify, seed] = result.curve
            rows.append({"verify": verify, "seed": seed, "steps": len(report["trace"]),
                         "accepted": sum(r["accepted"] for r in report["trace"]),
                         **curve_stats(result.curve, args.settle)})
            print(rows[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "acceptance_digits.csv", rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (verify, seed), curve in curves.items():
        ax.plot([c[0] for c in curve], [100 * c[2] for c in curve],
                color="C0" if verify == "loss" else "C3", lw=1, alpha=0.7,
                label=("verified on the calibration loss" if verify == "loss"
                       else "accepted on the Fisher estimate alone")
                if seed == args.seeds[0] else None)
    ax.set_xlabel("pruning time (s, wall)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(40, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"digits MLP, {100 * args.sparsity:.0f}% sparsity, seeds {args.seeds}")
    fig.tight_layout()
    fig.savefig(out / "acceptance_digits.png", dpi=110)


if __name__ == "__main__":
    main()
