"""Do refit-aware block steps generalize? Post-refit layer error on calibration and held-out
inputs, ALPS's support against iCBS's refit steps from it at several ridges.

Captures the dense model's input statistics of the chosen layers on calibration text and on
held-out text, prunes each layer by ALPS on the calibration statistics, then runs the
refit-aware steps (`icbs.refit_steps.improve_rows`, greedy solver) from ALPS with each ridge
(a fraction of mean(diag H), used for the steps and the final refit), and refits ALPS's own
support at each ridge (what the ridge alone does), reporting both errors (undamped H).
Writes refit_heldout.csv and refit_heldout.md.

    python experiments/refit_heldout.py --model MODEL --calib emma.txt --heldout persuasion.txt \
        --layers model.layers.3.self_attn.q_proj model.layers.20.self_attn.o_proj
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from refit_layers import capture

from icbs.baselines import alps_prune
from icbs.llm.load import load_model
from icbs.masks import parse_pattern
from icbs.reconstruct import least_squares_update, reconstruction_error
from icbs.refit_steps import improve_rows
from icbs.solver_choice import resolve_solver
from icbs.threads import set_threads

FIELDS = ["layer", "method", "ridge", "steps", "accepted", "error_calibration",
          "error_heldout", "heldout_vs_alps"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", nargs="+", required=True)
    parser.add_argument("--heldout", nargs="+", required=True)
    parser.add_argument("--layers", nargs="+", required=True)
    parser.add_argument("--ridges", nargs="+", type=float, default=[0.01, 0.1])
    parser.add_argument("--steps-per-row", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="experiments/results/llm")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    stats = {}
    for part, paths in (("calibration", args.calib), ("heldout", args.heldout)):
        model, tokenizer = load_model(args.model, "cpu")
        stats[part] = capture(model, tokenizer, paths, args.layers, args.nsamples, args.seqlen, 0)
    solver = resolve_solver("greedy")
    solver.warm_up()
    pattern = parse_pattern("per_output")
    rows = []
    for name in args.layers:
        w0, h = stats["calibration"][name]
        held = stats["heldout"][name][1]

        def errors(weight, w0=w0, h=h, held=held):
            return [float(reconstruction_error(w0.double(), weight.double(), m.double()).sum())
                    for m in (h, held)]

        weight, mask = alps_prune(w0, h, args.sparsity, pattern)
        alps = errors(weight)
        rows.append(dict(layer=name, method="alps", ridge=0.01, steps=0, accepted=0,
                         error_calibration=alps[0], error_heldout=alps[1], heldout_vs_alps=1.0))
        for ridge in args.ridges:  # ALPS's support refit at this ridge: the ridge alone
            found = errors(least_squares_update(w0, h, mask, damp=ridge, tol=1e-8))
            rows.append(dict(layer=name, method="alps support, refit", ridge=ridge, steps=0,
                             accepted=0, error_calibration=found[0], error_heldout=found[1],
                             heldout_vs_alps=found[1] / alps[1]))
        for ridge in args.ridges:
            result = improve_rows(w0, h, mask, start=weight, pattern=pattern, block_size=64,
                                  solver=solver, seed=0, damp=ridge,
                                  steps=args.steps_per_row * len(w0))
            found = errors(result.weight)
            rows.append(dict(layer=name, method="refit steps from alps", ridge=ridge,
                             steps=result.steps, accepted=result.accepted,
                             error_calibration=found[0], error_heldout=found[1],
                             heldout_vs_alps=found[1] / alps[1]))
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "refit_heldout.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| layer | method | ridge | steps (accepted) | error, calibration | error, held-out "
             "| held-out vs ALPS |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer'].removeprefix('model.layers.')} | {r['method']} | {r['ridge']} | "
              f"{r['steps']} ({r['accepted']}) | {r['error_calibration']:.4f} | "
              f"{r['error_heldout']:.4f} | {r['heldout_vs_alps']:.3f} |" for r in rows]
    (out / "refit_heldout.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
