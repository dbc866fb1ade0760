"""Post-refit layer error on real LLM layers: one-shot supports against refit-aware iCBS steps.

Captures the input statistics of chosen linear layers of the dense model (one sequential pass
over calibration windows), then per layer and setting compares the error after the
least-squares refit of the kept weights (damping 0.01; errors on the undamped H) of Wanda's,
SparseGPT's and ALPS's supports with iCBS's refit-aware block steps (`--objective refit`)
started from SparseGPT and from ALPS, at several step budgets per row. Writes
refit_layers.csv and refit_layers.md.

    python experiments/refit_layers.py --model MODEL.gguf --calib emma.txt \
        --layers model.layers.3.self_attn.q_proj model.layers.3.mlp.down_proj \
        --out experiments/results/llm
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from icbs.baselines import alps_prune, sparsegpt_prune, wanda_mask
from icbs.layerwise import improve_layer
from icbs.llm.data import calibration_windows, read_text, resolve_bos, tokenize
from icbs.llm.load import load_model
from icbs.llm.sequential import per_layer, prune_sequential
from icbs.reconstruct import least_squares_update, reconstruction_error

FIELDS = ["layer", "pattern", "sparsity", "method", "steps_per_row", "seconds", "error",
          "vs_sparsegpt", "vs_alps", "accepted", "steps"]


def capture(model, tokenizer, paths, names, nsamples, seqlen, seed) -> dict:
    """(w0, H) of the named layers of the dense model."""
    bos = resolve_bos(tokenizer)
    windows = calibration_windows(tokenize(tokenizer, read_text(paths), bos), nsamples,
                                  seqlen, seed, bos)
    seen = {}

    def record(name, module, cov):
        seen[name] = (module.weight.detach().float().clone(), cov.hessian.clone())
        return {}

    prune_sequential(model, windows, per_layer(record), include=names, progress=False)
    return seen


def compare(w0: torch.Tensor, h: torch.Tensor, pattern: str, sparsity: float, args) -> list:
    """One layer, one setting: every method's post-refit error and time."""
    def refit(mask, start=None):
        return least_squares_update(w0, h, mask, damp=0.01, start=start)

    found = {}  # method -> (weight, mask, seconds, accepted, steps)
    tic = time.perf_counter()
    mask = wanda_mask(w0, torch.sqrt(torch.diagonal(h)), sparsity, pattern)
    found["wanda+refit"] = (refit(mask), mask, time.perf_counter() - tic, 0, 0)
    tic = time.perf_counter()
    weight, mask = sparsegpt_prune(w0, h, sparsity, pattern, 128, 0.01)
    found["sparsegpt+refit"] = (refit(mask, weight), mask, time.perf_counter() - tic, 0, 0)
    tic = time.perf_counter()
    weight, mask = alps_prune(w0, h, sparsity, pattern)
    found["alps"] = (weight, mask, time.perf_counter() - tic, 0, 0)
    for start in ("sparsegpt+refit", "alps"):
        weight, mask, seconds, _, _ = found[start]
        for per_row in args.steps_per_row:
            result = improve_layer(w0, h, mask, weight=weight, pattern=pattern,
                                   sparsity=sparsity, steps=per_row * w0.shape[0],
                                   block_size=args.block_size, objective="refit", mask_damp=0.01,
                                   seed=args.seed)
            found[f"icbs-refit from {start.split('+')[0]}@{per_row}"] = (
                result.weight, result.mask, seconds + result.seconds, result.accepted,
                result.steps)

    def error(weight):
        return float(reconstruction_error(w0, weight, h).sum())

    base_s, base_a = error(found["sparsegpt+refit"][0]), error(found["alps"][0])
    rows = []
    for method, (weight, _, seconds, accepted, steps) in found.items():
        e = error(weight)
        name, _, per_row = method.partition("@")
        rows.append(dict(pattern=pattern, sparsity=sparsity, method=name,
                         steps_per_row=per_row or 0, seconds=round(seconds, 2), error=round(e, 4),
                         vs_sparsegpt=round(e / base_s, 4), vs_alps=round(e / base_a, 4),
                         accepted=accepted, steps=steps))
    return rows


def write(rows: list[dict], out: Path) -> None:
    """refit_layers.csv and a markdown table of the same rows."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "refit_layers.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| layer | setting | method | steps per row | seconds | error | vs SparseGPT+refit "
             "| vs ALPS |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer'].removeprefix('model.layers.')} | {r['pattern']} "
              f"{float(r['sparsity']):.0%} | {r['method']} | {r['steps_per_row']} | "
              f"{r['seconds']} | {r['error']} | {r['vs_sparsegpt']} | {r['vs_alps']} |"
              for r in rows]
    (out / "refit_layers.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", nargs="+", required=True, metavar="FILE")
    parser.add_argument("--layers", nargs="+", required=True, metavar="NAME")
    parser.add_argument("--settings", nargs="+", default=["per_output@0.5"])
    parser.add_argument("--steps-per-row", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="experiments/results/llm")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, "cpu")
    stats = capture(model, tokenizer, args.calib, args.layers, args.nsamples, args.seqlen,
                    args.seed)
    rows = []
    for name in args.layers:
        w0, h = stats[name]
        for setting in args.settings:
            pattern, _, sparsity = setting.partition("@")
            for row in compare(w0, h, pattern, float(sparsity or 0.5), args):
                rows.append(dict(layer=name, **row))
                print(",".join(str(rows[-1][f]) for f in FIELDS), flush=True)
            write(rows, Path(args.out))  # after every layer: an interrupted run keeps its rows


if __name__ == "__main__":
    main()
