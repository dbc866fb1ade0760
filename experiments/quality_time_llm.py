"""Perplexity versus pruning time on a causal LM: dense, magnitude, Wanda, SparseGPT and iCBS.

One CSV row per run (method, pattern, sparsity, budget, wall time, perplexity, and the summed
layer reconstruction errors of the one-shot start and of the result) and one PNG panel per
setting. `icbs` starts from Wanda (--init), `icbs+rec` from SparseGPT (--rec-init) and
alternates its block steps with least-squares updates of the kept weights, `icbs+refit` starts
from ALPS (--refit-init) and scores every block by the error after the refit
(`--objective refit`); `sparsegpt+rec` is SparseGPT followed by the refit alone. With
--dense-targets every method fits each layer to the dense model's outputs (the `targets`
column says which, with the target's ridge, and `error_dense` sums the layers' errors
against the dense model's outputs, comparable between runs). Rows already in the CSV are
skipped, so an interrupted run resumes; runs split over processes (each its own --out)
merge by concatenating their CSVs, after which a run of the script redraws the plot. Each
run's per-window NLLs go to window_nll.jsonl, for `paired_perplexity.py`, and its layers'
errors, block steps and seconds to layers.jsonl.

    python experiments/quality_time_llm.py --model MODEL.gguf --calib a.txt b.txt \
        --eval c.txt d.txt --budgets 120 600 --out experiments/results/llm
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import torch

from icbs.llm.commands import text_perplexity
from icbs.llm.load import choose_device, load_model, resolve_model_dir
from icbs.llm.prune import BUDGET_SHARES, INITS, LLMPruneSettings, prune_model
from icbs.masks import parse_setting
from icbs.refit_steps import BATCH_ELEMENTS
from icbs.threads import set_threads

FIELDS = ["method", "init", "reconstruct", "pattern", "sparsity", "budget", "prune_seconds",
          "perplexity", "nsamples", "seqlen", "scored_tokens", "budget_used", "error_start",
          "error_final", "steps", "accepted", "late_acceptance", "rows_visited", "targets",
          "error_dense", "order", "solver", "refit_batch_elements", "budget_share"]
# the fields that tell one run from another, kept with its windows' NLLs in window_nll.jsonl
KEY_FIELDS = ["method", "init", "pattern", "sparsity", "budget", "targets", "order", "solver",
              "refit_batch_elements", "budget_share", "perplexity"]
METHODS = ["dense", "magnitude", "wanda", "sparsegpt", "sparsegpt+rec", "alps", "icbs",
           "icbs+rec", "icbs+refit"]


DEFAULT_INITS = {"icbs": "wanda", "icbs+rec": "sparsegpt", "icbs+refit": "alps"}


def runs(args):
    """(key, settings or None for dense) for every run the arguments ask for."""
    if "dense" in args.methods:
        yield ("dense", "-", 0.0, 0.0), None
    for pattern, sparsity in map(parse_setting, args.settings):
        common = dict(pattern=pattern, sparsity=sparsity, nsamples=args.nsamples,
                      seqlen=args.seqlen, seed=args.seed, block_size=args.block_size,
                      solver=args.solver, dense_targets=args.dense_targets,
                      target_damp=args.target_damp, true_sequential=args.true_sequential,
                      budget_share=args.budget_share)
        for method in args.methods:
            if method in ("magnitude", "wanda", "sparsegpt", "alps"):
                yield (method, pattern, sparsity, 0.0), LLMPruneSettings(method=method, **common)
            elif method == "sparsegpt+rec":
                yield (method, pattern, sparsity, 0.0), LLMPruneSettings(
                    method="sparsegpt", reconstruct=True, **common)
            elif method == "icbs":
                for budget in args.budgets:
                    yield (method, pattern, sparsity, float(budget)), LLMPruneSettings(
                        method="icbs", budget=budget, init=args.init, **common)
            elif method == "icbs+rec":
                for budget in args.rec_budgets or args.budgets:
                    yield (method, pattern, sparsity, float(budget)), LLMPruneSettings(
                        method="icbs", budget=budget, init=args.rec_init, reconstruct=True,
                        **common)
            elif method == "icbs+refit":
                for budget in args.refit_budgets or args.budgets:
                    yield (method, pattern, sparsity, float(budget)), LLMPruneSettings(
                        method="icbs", budget=budget, init=args.refit_init, objective="refit",
                        refit_batch_elements=args.refit_batch_elements, **common)


def convergence(records: list[dict]) -> dict:
    """Block steps and acceptance summed over the layers; for the refit objective also the
    acceptance over each row's last steps and the fraction of rows the budget reached."""
    steps = sum(r.get("steps", 0) for r in records)
    out = {"steps": steps, "accepted": sum(r.get("accepted", 0) for r in records),
           "late_acceptance": "", "rows_visited": ""}
    conv = [r["convergence"] for r in records if "convergence" in r]
    if conv:
        visited = sum(c["rows_visited"] for c in conv)
        out["rows_visited"] = round(visited / sum(c["rows"] for c in conv), 4)
        out["late_acceptance"] = round(sum(c["late_acceptance"] * c["rows_visited"]
                                           for c in conv) / max(visited, 1), 4)
    return out


LAYER_FIELDS = ("name", "shape", "error_before", "error_after", "error_dense", "steps",
                "accepted", "seconds_start", "seconds_icbs", "seconds_steps")


def layer_summary(record: dict) -> dict:
    """One layer's errors, block steps and seconds from a pruning report's record."""
    return {f: record[f] for f in LAYER_FIELDS if f in record}


def _solver(method: str, solver: str) -> str:
    """The solver column: the block steps' solver, empty for a method without them."""
    return solver if method.startswith("icbs") else ""


def _batch(method: str, batch_elements) -> str:
    """The refit_batch_elements column: the refit steps' batch size, empty for other methods
    (rows written before the column existed ran with the default)."""
    return str(batch_elements or BATCH_ELEMENTS) if method == "icbs+refit" else ""


def _share(method: str, budget_share) -> str:
    """The budget_share column: how iCBS's budget went to the layers, empty for a method
    without block steps (rows written before the column existed shared it by weights)."""
    return (budget_share or "weights") if method.startswith("icbs") else ""


def _line(row: dict) -> tuple[str, str, str, str, str, str]:
    """(method, init, targets, order, solver, budget share) of a CSV row: the runs one
    plotted line joins."""
    return (row["method"], row["init"], row.get("targets") or "pruned",
            row.get("order") or "block", row.get("solver") or _solver(row["method"], "anneal"),
            _share(row["method"], row.get("budget_share")))


def _layer_error(row: dict) -> float | None:
    """The summed layer error a row is judged by: against the dense model's outputs for dense
    targets, else against the layers' outputs on the pruned model's inputs (None: not
    measured, as for magnitude)."""
    value = row.get("error_dense") if (row.get("targets") or "pruned") != "pruned" \
        else row.get("error_final")
    return float(value) if value and float(value) > 0 else None


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity (top) and summed layer error (bottom) against pruning time, a column per
    setting, one legend for all panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["pattern"], float(r["sparsity"])) for r in rows
                       if r["method"] != "dense"})
    dense = [float(r["perplexity"]) for r in rows if r["method"] == "dense"]
    columns = max(1, len(settings))
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    legend = {}
    for column, (pattern, sparsity) in enumerate(settings):
        chosen = [r for r in rows if r["pattern"] == pattern and float(r["sparsity"]) == sparsity]
        for key in sorted({_line(r) for r in chosen},
                          key=lambda m: (METHODS.index(m[0]), *m[1:])):
            method, init, targets, order, solver, share = key
            line = sorted(((float(r["prune_seconds"]), float(r["perplexity"]), _layer_error(r))
                           for r in chosen if _line(r) == key),
                          key=lambda point: point[0])  # by time: an error may be None
            icbs = method.startswith("icbs")
            # one colour per method across panels; an iCBS start other than its default
            # dashed, a solver other than anneal dotted; dense targets drawn with open
            # diamonds (stars: the budget shared by error, pentagons: the blocks' too),
            # true-sequential order with triangles
            style = (":" if solver not in ("", "anneal") else
                     "--" if init != DEFAULT_INITS[method] else "-") if icbs else ""
            marker = ("*" if share == "error" else "p" if share == "error+blocks" else
                      "D" if targets != "pruned" else
                      "^" if order == "sequential" else "o" if icbs else "s")
            label = f"{method} from {init}" if icbs else method
            label += "" if targets == "pruned" else f", targets {targets}"
            label += "" if solver in ("", "anneal") else f", {solver}"
            label += {"error": ", budget by error",
                      "error+blocks": ", budget by error, blocks too"}.get(share, "")
            if (order == "sequential") == (targets == "pruned"):  # not the default order
                label += ", true sequential" if order == "sequential" else ", block at once"
            look = dict(color=f"C{METHODS.index(method)}",
                        mfc="none" if targets != "pruned" else None)
            (handle,) = axes[0, column].plot([t for t, _, _ in line], [p for _, p, _ in line],
                                             marker + style, **look)
            legend.setdefault(label, handle)
            measured = [(t, e) for t, _, e in line if e is not None]
            if measured:
                axes[1, column].plot(*zip(*measured, strict=True), marker + style, **look)
        if dense:
            legend.setdefault("dense", axes[0, column].axhline(dense[0], color="gray", ls="--"))
        axes[0, column].set(title=f"{pattern} {sparsity:.0%}", ylabel="perplexity",
                            yscale="log")
        axes[1, column].set(xlabel="pruning time (s)", yscale="log",
                            ylabel="summed layer error")
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.022 * ((len(legend) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory or .gguf file")
    parser.add_argument("--calib", nargs="+", required=True, metavar="FILE")
    parser.add_argument("--eval", nargs="+", required=True, metavar="FILE")
    parser.add_argument("--settings", nargs="+",
                        default=["per_output@0.5", "2:4", "per_output@0.7"],
                        help='PATTERN@SPARSITY, e.g. "per_output@0.5"; N:M alone, e.g. "2:4"')
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, default=[120.0, 600.0],
                        help="iCBS seconds of block steps over the whole model")
    parser.add_argument("--rec-budgets", nargs="+", type=float, default=None,
                        help="budgets of iCBS with reconstruction (default: --budgets)")
    parser.add_argument("--init", default=DEFAULT_INITS["icbs"], choices=INITS,
                        help="start of icbs")
    parser.add_argument("--rec-init", default=DEFAULT_INITS["icbs+rec"], choices=INITS,
                        help="start of icbs+rec")
    parser.add_argument("--refit-budgets", nargs="+", type=float, default=None,
                        help="budgets of iCBS with the refit objective (default: --budgets)")
    parser.add_argument("--refit-init", default=DEFAULT_INITS["icbs+refit"], choices=INITS,
                        help="start of icbs+refit")
    parser.add_argument("--refit-batch-elements", type=int, default=BATCH_ELEMENTS,
                        help="icbs+refit: stacked-inverse entries of a batch of rows (icbs "
                             "prune --refit-batch-elements)")
    parser.add_argument("--budget-share", default="weights", choices=BUDGET_SHARES,
                        help="iCBS: a block's layers share its budget by weight count or by "
                             "the block before's start errors, and with error+blocks the "
                             "blocks by forecast errors (icbs prune --budget-share)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384, help="evaluated tokens")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--solver", default="anneal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-targets", action="store_true",
                        help="fit every layer to the dense model's outputs (icbs prune "
                             "--dense-targets)")
    parser.add_argument("--target-damp", type=float, default=0.1,
                        help="ridge of the dense targets (icbs prune --target-damp)")
    parser.add_argument("--true-sequential", action="store_true",
                        help="a block's layers group by group in call order (icbs prune "
                             "--true-sequential; always so with --dense-targets)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N: where the model is pruned and evaluated")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 measured fastest on a shared 2-core machine)")
    parser.add_argument("--out", default="experiments/results/llm")
    parser.add_argument("--save-models", default=None, metavar="DIR",
                        help="also save every pruned model (safetensors and tokenizer) under "
                             "DIR/<method>-<init>-<pattern>-<sparsity>-<budget>, e.g. for "
                             "`icbs eval --tasks`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "quality_time.csv"
    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    targets = f"dense@{args.target_damp:g}" if args.dense_targets else "pruned"
    order = "sequential" if args.true_sequential or args.dense_targets else "block"
    done = {(r["method"], r["init"], r["pattern"], float(r["sparsity"]), float(r["budget"]),
             r.get("targets") or "pruned", r.get("order") or "block",
             r.get("solver") or _solver(r["method"], "anneal"),
             _batch(r["method"], r.get("refit_batch_elements")),
             _share(r["method"], r.get("budget_share"))) for r in rows}
    device = choose_device(args.device)
    model_dir = resolve_model_dir(args.model)
    for key, settings in runs(args):
        method, pattern, sparsity, budget = key
        init = settings.init if method.startswith("icbs") else ""
        if (method, init, pattern, sparsity, budget, targets, order,
                _solver(method, args.solver),
                _batch(method, args.refit_batch_elements),
                _share(method, args.budget_share)) in done:
            continue
        model, tokenizer = load_model(model_dir, device)
        tic = time.perf_counter()
        report = {"layers": [], "budget_used": 0.0}
        if settings is not None:
            report = prune_model(model, tokenizer, settings, args.calib, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tic
        if args.save_models:
            name = "-".join(str(part) for part in (method, init or "none", pattern.replace(
                ":", "of"), sparsity, budget))
            model.save_pretrained(Path(args.save_models) / name)
            tokenizer.save_pretrained(Path(args.save_models) / name)
        result = text_perplexity(model, tokenizer, args.eval, args.seqlen, args.max_tokens,
                                 progress=False)
        row = dict(method=method, init=init,
                   reconstruct=settings is not None and settings.reconstruct,
                   pattern=pattern, sparsity=sparsity,
                   budget=budget, prune_seconds=round(seconds, 1),
                   perplexity=round(result["perplexity"], 3), nsamples=args.nsamples,
                   seqlen=args.seqlen, scored_tokens=result["scored_tokens"],
                   budget_used=round(report["budget_used"], 1),
                   error_start=sum(r.get("error_before", 0.0) for r in report["layers"]),
                   error_final=sum(r.get("error_after", 0.0) for r in report["layers"]),
                   **convergence(report["layers"]), targets=targets,
                   error_dense=sum(r.get("error_dense", 0.0) for r in report["layers"]),
                   order=order, solver=_solver(method, args.solver),
                   refit_batch_elements=_batch(method, args.refit_batch_elements),
                   budget_share=_share(method, args.budget_share))
        rows.append({k: str(v) for k, v in row.items()})
        print(",".join(str(row[f]) for f in FIELDS), flush=True)
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        run_key = {f: row[f] for f in KEY_FIELDS}
        for name, record in (
                ("window_nll.jsonl",  # for paired_perplexity.py
                 {"text": result["text"], "window_nll": result["window_nll"]}),
                ("layers.jsonl",  # where the steps pay off
                 {"layers": [layer_summary(r) for r in report["layers"]]})):
            with (out / name).open("a") as handle:
                handle.write(json.dumps(run_key | record) + "\n")
        plot(rows, out / "quality_time.png")
    if rows:  # also when every run was already in the CSV, e.g. merged from parallel runs
        plot(rows, out / "quality_time.png")


if __name__ == "__main__":
    main()
