"""The `icbs` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def add_demo_command(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="prune the bundled digits MLP with magnitude, Wanda and iCBS",
        description="Train (once, cached) a 64-256-128-10 MLP on scikit-learn's digits, prune "
                    "it with magnitude, Wanda and iCBS, print a table and write report.json "
                    "and accuracy.png.")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction pruned (default 0.9)")
    p.add_argument("--budget", type=float, default=60.0, help="iCBS seconds (default 60)")
    p.add_argument("--pattern", default="unstructured",
                   help="unstructured, per_output or N:M (default unstructured)")
    p.add_argument("--block-size", type=int, default=256, help="QUBO variables (default 256)")
    p.add_argument("--solver", default="anneal",
                   help="block solver: anneal, greedy, neal, ... or dimod:<module>:<class> (any "
                        "dimod sampler; the block size is capped at its declared maximum)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="icbs-demo", help="output folder (default icbs-demo)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of torch and of the solvers (default 1: block steps are "
                        "small, more threads only add overhead)")
    p.set_defaults(func=_demo)


def _demo(args) -> None:
    from icbs.demo import format_table, run_demo
    from icbs.threads import set_threads

    set_threads(args.threads)
    results = run_demo(args.sparsity, args.budget, seed=args.seed, block_size=args.block_size,
                       pattern=args.pattern, out=args.out, solver=args.solver,
                       progress=sys.stderr.isatty())
    print(format_table(results))
    print(f"wrote {args.out}/report.json and {args.out}/accuracy.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="icbs", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_demo_command(subparsers)
    from icbs.llm.commands import add_commands

    add_commands(subparsers)
    from icbs.export import add_export_command

    add_export_command(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"icbs {args.command}: error: {exc}\n")


if __name__ == "__main__":
    main()
