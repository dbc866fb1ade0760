"""Where a second of refit steps pays most: the error that iCBS's refit-aware steps remove
from ALPS's support, per layer of one decoder block, at several time budgets, on the
calibration inputs and on held-out ones.

Captures the input statistics of a block's linear layers of the dense model on the
calibration text and on held-out text (one sequential pass each), prunes each layer with
ALPS on the calibration statistics, then gives it runs of `--objective refit` steps (ridge
0.1, as `icbs prune` does) of `--scales` times its share of `--budget` seconds over the model
by weight count (what `--budget-share weights` gives it). The held-out error removed per
second, layer by layer, says where the budget is best spent. Writes refit_payoff.csv.

    python experiments/refit_payoff.py --model MODEL.gguf --calib emma.txt \
        --heldout mansfieldpark.txt --block 10 --out experiments/results/llm
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from refit_layers import capture

from icbs.baselines import alps_prune
from icbs.layerwise import improve_layer
from icbs.llm.load import load_model, resolve_model_dir
from icbs.llm.prune import LLMPruneSettings, prunable_layers
from icbs.masks import parse_setting
from icbs.reconstruct import reconstruction_error
from icbs.threads import set_threads

FIELDS = ["layer", "shape", "pattern", "sparsity", "scale", "seconds_budget",
          "seconds", "steps", "error_alps", "error", "error_vs_alps", "heldout_alps",
          "heldout", "heldout_vs_alps", "heldout_removed_per_s"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", nargs="+", required=True, metavar="FILE")
    parser.add_argument("--heldout", nargs="+", required=True, metavar="FILE")
    parser.add_argument("--block", type=int, default=10, help="decoder block to measure")
    parser.add_argument("--setting", default="per_output@0.5")
    parser.add_argument("--budget", type=float, default=1400.0,
                        help="seconds of steps over the whole model the shares come from")
    parser.add_argument("--scales", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="experiments/results/llm")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    pattern, sparsity = parse_setting(args.setting)
    model, tokenizer = load_model(resolve_model_dir(args.model), "cpu")
    defaults = LLMPruneSettings()  # the ridges of `icbs prune`'s steps and refit
    shapes = {name: tuple(layer.weight.shape) for name, layer in prunable_layers(
        model, defaults).items()}
    total = sum(r * c for r, c in shapes.values())
    names = [n for n in shapes if f".layers.{args.block}." in n]
    stats = capture(model, tokenizer, args.calib, names, args.nsamples, args.seqlen, 0)
    held = capture(model, tokenizer, args.heldout, names, args.nsamples, args.seqlen, 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        w0, h = stats[name]
        h_held = held[name][1]

        def errors(weight, w0=w0, h=h, h_held=h_held):
            return (float(reconstruction_error(w0, weight, h).sum()),
                    float(reconstruction_error(w0, weight, h_held).sum()))

        weight, mask = alps_prune(w0, h, sparsity, pattern, damp=defaults.percdamp)
        error_alps, heldout_alps = errors(weight)
        height, width = shapes[name]
        for scale in args.scales:
            seconds = args.budget * height * width / total * scale
            tic = time.perf_counter()
            result = improve_layer(w0, h, mask, weight=weight, pattern=pattern,
                                   sparsity=sparsity, seconds=seconds,
                                   block_size=args.block_size, objective="refit",
                                   mask_damp=defaults.mask_damp, damp=defaults.percdamp)
            took = time.perf_counter() - tic
            error, heldout = errors(result.weight)
            row = dict(layer=name.split("layers.")[-1], shape=f"{height}x{width}",
                       pattern=pattern, sparsity=sparsity, scale=scale,
                       seconds_budget=round(seconds, 2), seconds=round(took, 2),
                       steps=result.steps, error_alps=round(error_alps, 4),
                       error=round(error, 4), error_vs_alps=round(error / error_alps, 4),
                       heldout_alps=round(heldout_alps, 4), heldout=round(heldout, 4),
                       heldout_vs_alps=round(heldout / heldout_alps, 4),
                       heldout_removed_per_s=round((heldout_alps - heldout) / took, 5))
            rows.append(row)
            print(",".join(str(row[f]) for f in FIELDS), flush=True)
    with (out / "refit_payoff.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
