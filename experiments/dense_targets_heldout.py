"""Does fitting a layer to the dense model's outputs generalize? The dense-output error of
each layer's dense target on calibration and held-out text, for several target ridges.

Runs the first `--blocks` decoder blocks on calibration and held-out windows, the model
pruned so far (by SparseGPT, plain targets) beside the dense one, so each layer's
statistics are paired with the dense model's (`collect_statistics`). For every layer it
reports |W X - W0 X0|^2 / tokens (`dense_output_error`) of the dense weights W0 and of the
dense target T (`dense_target`, fit on the calibration statistics) at each ridge, on both
texts. Writes dense_targets_heldout.csv.

    python experiments/dense_targets_heldout.py --model MODEL --calib emma.txt \
        --heldout persuasion.txt --blocks 6 --nsamples 64
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from icbs.layer_pruning import start_weight
from icbs.layer_stats import dense_output_error, dense_target
from icbs.llm.data import calibration_windows, read_text, tokenize
from icbs.llm.load import load_model, resolve_model_dir
from icbs.llm.prune import LLMPruneSettings
from icbs.llm.sequential import (
    capture_block_inputs,
    collect_statistics,
    decoder_blocks,
    dense_pass,
    run_block,
    select_linears,
)

FIELDS = ["layer", "weights", "target_damp", "error_calibration", "error_heldout",
          "heldout_vs_dense_weights", "max_abs_vs_dense_weights"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", nargs="+", required=True)
    parser.add_argument("--heldout", nargs="+", required=True)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--heldout-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--damps", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="experiments/results/llm")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(resolve_model_dir(args.model), "cpu")
    prefix, blocks = decoder_blocks(model)
    streams = {}
    for which, files, count in (("calibration", args.calib, args.nsamples),
                                ("heldout", args.heldout, args.heldout_samples)):
        windows = calibration_windows(tokenize(tokenizer, read_text(files), None), count,
                                      args.seqlen, 0, None)
        inputs = capture_block_inputs(model, blocks[0], windows)
        streams[which] = [inputs, list(inputs.hidden)]  # pruned-model inputs, dense ones
    settings = LLMPruneSettings(method="sparsegpt", sparsity=0.5)
    rows = []
    for index in range(args.blocks):
        block = blocks[index]
        layers = select_linears(block, f"{prefix}.{index}")
        stats, dense_next = {}, {}
        for which, (inputs, dense) in streams.items():
            dense_next[which], dense_inputs = dense_pass(block, layers, dense, inputs)
            stats[which] = collect_statistics(block, layers, inputs, dense_inputs)
        for name, module in layers.items():
            w0 = module.weight.detach().float()
            candidates = [("dense", None, w0)] + [
                ("target", damp, dense_target(w0, stats["calibration"][name], damp))
                for damp in args.damps]
            base = None
            for weights, damp, w in candidates:
                errors = {which: dense_output_error(w0, w, stats[which][name])
                          for which in stats}
                base = base or errors  # the dense weights' errors come first
                rows.append(dict(layer=name, weights=weights, target_damp=damp or "",
                                 error_calibration=round(errors["calibration"], 4),
                                 error_heldout=round(errors["heldout"], 4),
                                 heldout_vs_dense_weights=round(
                                     errors["heldout"] / base["heldout"], 4)
                                 if base["heldout"] > 0 else "",
                                 max_abs_vs_dense_weights=round(
                                     float(w.abs().max() / w0.abs().max()), 3)))
            print(name, " ".join(f"{r['weights']}@{r['target_damp']}: "
                                 f"{r['heldout_vs_dense_weights']}" for r in rows[-4:]),
                  flush=True)
        for name, module in layers.items():  # plain SparseGPT: one trajectory for every ridge
            weight, _, _ = start_weight(settings, module.weight.detach().float(),
                                        stats["calibration"][name])
            with torch.no_grad():
                module.weight.copy_(weight.to(module.weight.dtype))
        for which, stream in streams.items():
            stream[0].hidden = run_block(block, stream[0])
            stream[1] = dense_next[which]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "dense_targets_heldout.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
