"""Top-1 accuracy versus pruning time on Fashion-MNIST: a DeiT-style ViT and a ResNet pruned by
magnitude, Wanda, SparseGPT, ALPS and iCBS.

The dense models are trained once (seeded, cached; `icbs.vision.train.RECIPES`). Each run
prunes a copy on calibration images drawn from the training set by the run's seed:
the one-shot methods layer by layer on the inputs of the model pruned so far
(`icbs.prune_layer_by_layer`); `icbs-fisher` with the Fisher objective over the whole model
from Wanda's mask, as the paper prunes DeiT, on the first `--fisher-samples` calibration
images, since every step runs the model on them (`icbs.Pruner`; its budgets are read off one run
of the longest, the accuracy measured when the step time passes each budget); `icbs-refit`
layer by layer from ALPS's mask, every block scored by the layer error after the refit of
the kept weights (one run per budget). The patch embedding / stem convolution and the head
stay dense unless `--prune-ends` (as DeiT and CNN pruning papers report). One CSV row per
run and a PNG of accuracy versus pruning time per model and setting:

    python experiments/quality_time_vision.py --data /usr/share/datasets/fashion-mnist \
        --out experiments/results/vision

`--dense-targets` fits the layer-by-layer methods to the dense model's outputs (rows to a
separate --out). `--quick` trains on 512 images for one epoch and prunes once per model
(under 2 minutes; the tests run it on generated images).
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from icbs import Budget, Pruner, Settings, prune_layer_by_layer
from icbs.batchnorm import recalibrate_batchnorm
from icbs.masks import parse_setting
from icbs.report import write_csv
from icbs.vision.data import DEFAULT_DIR, load_fashion_mnist
from icbs.vision.train import RECIPES, VisionRecipe, accuracy, trained_model

FIELDS = ["model", "method", "init", "pattern", "sparsity", "budget", "seed", "prune_seconds",
          "test_acc", "layer_error", "steps", "accepted"]
ONE_SHOT = ["magnitude", "wanda", "sparsegpt", "alps"]
METHODS = [*ONE_SHOT, "icbs-fisher", "icbs-refit"]
ENDS = {"vit": ("patch_embed.*", "head"), "resnet": ("conv1", "fc")}
SETTINGS = {"vit": ["unstructured@0.5", "unstructured@0.6", "unstructured@0.7",
                    "unstructured@0.8", "2:4"],
            "resnet": ["unstructured@0.5", "unstructured@0.6", "unstructured@0.7",
                       "unstructured@0.8"]}


def calibration(data, size: int, seed: int, batch: int = 128) -> list[tuple]:
    """`size` training images and labels drawn by `seed`, in batches."""
    index = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    index = index[:size]
    return [(data.x_train[index[i:i + batch]], data.y_train[index[i:i + batch]])
            for i in range(0, size, batch)]


def fisher_batches(calib: list[tuple], samples: int) -> list[tuple]:
    """The first `samples` calibration images: every Fisher step re-runs the model on them."""
    x = torch.cat([b[0] for b in calib])[:samples]
    y = torch.cat([b[1] for b in calib])[:samples]
    return [(x, y)]


def run_key(model, method, pattern, sparsity, budget, seed) -> tuple:
    """What identifies a run in the CSV (rows already there are not run again)."""
    return (model, method, pattern, f"{float(sparsity):g}", f"{float(budget):g}", str(seed))


def test_accuracy(model, data, calib, recalibrate: bool) -> float:
    """Top-1 test accuracy; with `recalibrate`, of a copy whose BatchNorm statistics were
    re-estimated on the calibration images first."""
    if recalibrate:
        model = copy.deepcopy(model)
        recalibrate_batchnorm(model, calib)
    return accuracy(model, data.x_test, data.y_test)


def summed_error(report: dict) -> float:
    return sum(layer.get("error_after", 0.0) for layer in report["layers"])


def layer_by_layer(dense, calib, data, method: str, common: dict, recalibrate: bool,
                   **extra) -> dict:
    model = copy.deepcopy(dense)
    tic = time.perf_counter()
    report = prune_layer_by_layer(model, calib, method=method, **common, **extra)
    seconds = time.perf_counter() - tic
    steps = sum(layer.get("steps", 0) for layer in report["layers"])
    accepted = sum(layer.get("accepted", 0) for layer in report["layers"])
    return dict(prune_seconds=seconds, test_acc=test_accuracy(model, data, calib, recalibrate),
                layer_error=summed_error(report), steps=steps, accepted=accepted)


def fisher_curve(dense, calib, data, common: dict, budgets: list[float], block_size: int,
                 recalibrate: bool) -> list[dict]:
    """One Fisher-objective iCBS run to the longest budget; accuracy as each budget passes
    (budgets the run ends before passing get its final state)."""
    model = copy.deepcopy(dense)
    settings = Settings(objective="fisher", init="wanda", block_size=block_size, **common)
    tic = time.perf_counter()
    pruner = Pruner(model, calib, settings, loss_fn=F.cross_entropy)
    init = time.perf_counter() - tic
    marks = sorted(budgets)
    rows = []

    def record(p: Pruner, passed: list[float]) -> None:
        state = dict(prune_seconds=init + p.elapsed,
                     test_acc=test_accuracy(model, data, calib, recalibrate),
                     steps=len(p.trace), accepted=sum(r.accepted for r in p.trace))
        rows.extend(dict(budget=budget, **state) for budget in passed)

    def at_step(p: Pruner, _record=None) -> None:
        passed = [m for m in marks if p.elapsed >= m]
        if passed:
            del marks[:len(passed)]
            record(p, passed)
        if not marks:
            p.stop()

    pruner.run(Budget(seconds=max(budgets) * 1.01), callback=at_step)
    pruner.finish()
    if marks:
        record(pruner, marks)
    return rows


def runs_for(arch: str, dense, data, args, done: set):
    """The rows of every run not yet `done`, a list per setting and seed."""
    for setting in args.settings or SETTINGS[arch]:
        pattern, sparsity = parse_setting(setting)
        seeds = args.seeds if sparsity in args.seeded or not args.seeded else args.seeds[:1]
        for seed in seeds:
            rows = []
            calib = calibration(data, args.calib_size, seed)
            common = dict(sparsity=sparsity, pattern=pattern, seed=seed,
                          exclude=() if args.prune_ends else ENDS[arch])
            base = dict(model=arch, pattern=pattern, sparsity=sparsity, seed=seed)
            by_layer = (dict(common, dense_targets=True, target_damp=args.target_damp)
                        if args.dense_targets else common)
            def fresh(method, budget, where=(arch, pattern, sparsity, seed)):
                return run_key(where[0], method, *where[1:3], budget, where[3]) not in done

            for method in ONE_SHOT:
                if method in args.methods and fresh(method, 0):
                    rows.append(dict(base, method=method, init="-", budget=0,
                                     **layer_by_layer(dense, calib, data, method, by_layer,
                                                      args.recalibrate_bn)))
            todo = [b for b in args.budgets
                    if "icbs-fisher" in args.methods and fresh("icbs-fisher", b)]
            if todo:
                for row in fisher_curve(dense, fisher_batches(calib, args.fisher_samples), data,
                                        common, todo, args.block_size, args.recalibrate_bn):
                    rows.append(dict(base, method="icbs-fisher", init="wanda",
                                     layer_error="", **row))
            for budget in args.budgets:
                if "icbs-refit" in args.methods and fresh("icbs-refit", budget):
                    rows.append(dict(base, method="icbs-refit", init="alps", budget=budget,
                                     **layer_by_layer(dense, calib, data, "icbs", by_layer,
                                                      args.recalibrate_bn, init="alps",
                                                      objective="refit", budget=budget,
                                                      mask_damp=args.mask_damp,
                                                      block_size=args.refit_block_size)))
            print(f"{arch} {setting} seed {seed}: " + ", ".join(
                f"{r['method']}@{r['budget']:g} {100 * r['test_acc']:.2f}" for r in rows),
                flush=True)
            yield rows


def medians(rows: list[dict]) -> list[dict]:
    """Median test accuracy and pruning time over seeds per (model, method, setting, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["pattern"], float(r["sparsity"]),
                           float(r["budget"])), []).append(r)
    return [dict(model=k[0], method=k[1], pattern=k[2], sparsity=k[3], budget=k[4],
                 seeds=len(g), test_acc=statistics.median(float(r["test_acc"]) for r in g),
                 prune_seconds=statistics.median(float(r["prune_seconds"]) for r in g))
            for k, g in groups.items()]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["pattern"], r["sparsity"]) for r in rows
                     if r["method"] != "dense"})
    ncols = min(5, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (model, pattern, sparsity) in zip(axes.flat, panels, strict=False):
        cell = [r for r in rows if (r["model"], r["pattern"], r["sparsity"])
                == (model, pattern, sparsity)]
        for method in sorted({r["method"] for r in cell}):
            pts = sorted((r["prune_seconds"], 100 * r["test_acc"]) for r in cell
                         if r["method"] == method)
            ax.plot(*zip(*pts, strict=True), "o-" if method.startswith("icbs") else "s",
                    label=method)
        dense = [r for r in rows if r["model"] == model and r["method"] == "dense"]
        if dense:
            ax.axhline(100 * dense[0]["test_acc"], color="gray", ls=":", label="dense")
        ax.set_xscale("log")
        ax.set_title(f"{model} {pattern} {sparsity:g}")
        ax.set_xlabel("pruning time (s)")
        ax.set_ylabel("test top-1 (%), median over seeds")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DIR), help="Fashion-MNIST IDX directory")
    parser.add_argument("--models", nargs="+", default=["vit", "resnet"],
                        choices=sorted(RECIPES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--settings", nargs="+", help="PATTERN@SPARSITY or N:M "
                        "(default: 50-80%% unstructured, and 2:4 for the ViT)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeded", type=float, nargs="*", default=[0.5, 0.6, 0.7],
                        help="sparsities run with every seed (others with the first); "
                             "none given: all")
    parser.add_argument("--budgets", type=float, nargs="+", default=[10, 40],
                        help="iCBS seconds of block steps")
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--fisher-samples", type=int, default=128,
                        help="calibration images of the Fisher objective (the first ones)")
    parser.add_argument("--block-size", type=int, default=64, help="Fisher iCBS block size")
    parser.add_argument("--refit-block-size", type=int, default=32)
    parser.add_argument("--mask-damp", type=float, default=0.1,
                        help="ridge the refit objective scores masks under (fraction of "
                             "mean(diag H); the library's default)")
    parser.add_argument("--prune-ends", action="store_true",
                        help="also prune the patch embedding / stem and the head")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="re-estimate BatchNorm statistics on the calibration images after "
                             "pruning, for every method")
    parser.add_argument("--dense-targets", action="store_true",
                        help="layer-by-layer methods fit every layer to the dense model's "
                             "outputs (write to their own --out)")
    parser.add_argument("--target-damp", type=float, default=0.1,
                        help="ridge of the dense targets, x mean(diag H)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="experiments/results/vision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_fashion_mnist(args.data)
    recipes = dict(RECIPES)
    if args.quick:
        recipes = {arch: VisionRecipe(arch, epochs=1, train_subset=512) for arch in RECIPES}
        data.x_test, data.y_test = data.x_test[:500], data.y_test[:500]
        args.settings = args.settings or ["unstructured@0.5"]
        args.seeds, args.budgets, args.calib_size = args.seeds[:1], [1.0], 128
    name = "quality_time" + ("_bn" if args.recalibrate_bn else "") + ("_quick" if args.quick
                                                                       else "")
    csv_path = out / f"{name}.csv"
    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    done = {run_key(*(r[k] for k in ("model", "method", "pattern", "sparsity", "budget",
                                      "seed"))) for r in rows}
    for arch in args.models:
        tic = time.perf_counter()
        dense, record = trained_model(recipes[arch], data)
        if run_key(arch, "dense", "-", 0, 0, 0) not in done:
            rows.append(dict(model=arch, method="dense", init="-", pattern="-", sparsity=0,
                             budget=0, seed=0, prune_seconds=0,
                             test_acc=accuracy(dense, data.x_test, data.y_test),
                             layer_error="", steps=0, accepted=0))
            print(f"{arch}: dense test accuracy {100 * float(rows[-1]['test_acc']):.2f}% "
                  f"(training {record['train_seconds']:.0f} s, now {time.perf_counter() - tic:.0f}"
                  " s)", flush=True)
        write_csv(csv_path, [{k: r.get(k, "") for k in FIELDS} for r in rows])
        for fresh_rows in runs_for(arch, dense, data, args, done):
            rows += fresh_rows
            write_csv(csv_path, [{k: r.get(k, "") for k in FIELDS} for r in rows])
    summary = medians(rows)
    write_csv(out / csv_path.name.replace(".csv", "_medians.csv"), summary)
    plot(summary, out / csv_path.name.replace(".csv", ".png"))
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
