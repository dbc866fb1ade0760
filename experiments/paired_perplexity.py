"""Is one pruned model's perplexity really below another's? A paired bootstrap over the
evaluation windows of two runs of `quality_time_llm.py` (its window_nll.jsonl).

    python experiments/paired_perplexity.py experiments/results/llm/window_nll.jsonl \
        --a method=alps pattern=2:4 --b method=icbs+refit pattern=2:4 budget=900.0

Prints B's perplexity over A's with a 95% interval; an interval that holds 1 means the two
are not told apart on this text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icbs.llm.evaluate import paired_ratio


def pick(runs: list[dict], selector: list[str]) -> dict:
    """The one run whose fields equal every `field=value` of `selector`."""
    bad = [item for item in selector if "=" not in item]
    if bad:
        raise SystemExit(f"{' '.join(bad)}: a run is chosen by FIELD=VALUE, e.g. method=alps")
    wanted = dict(item.split("=", 1) for item in selector)
    found = [r for r in runs if all(str(r.get(k)) == v for k, v in wanted.items())]
    if len(found) != 1:
        raise SystemExit(f"{' '.join(selector)} matches {len(found)} runs, not one; add "
                         f"fields (method, init, pattern, sparsity, budget, targets, ...)")
    return found[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="window_nll.jsonl of quality_time_llm.py")
    parser.add_argument("--a", nargs="+", required=True, metavar="FIELD=VALUE")
    parser.add_argument("--b", nargs="+", required=True, metavar="FIELD=VALUE")
    parser.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args(argv)
    runs = [json.loads(line) for line in args.runs.read_text().splitlines() if line.strip()]
    a, b = pick(runs, args.a), pick(runs, args.b)
    if a["text"] != b["text"]:
        raise SystemExit(f"the runs scored different text: {a['text']} and {b['text']}")
    result = paired_ratio(a["window_nll"], b["window_nll"], args.resamples)
    print(f"A {a['perplexity']}, B {b['perplexity']}: B / A = {result['ratio']:.4f} "
          f"(95% {result['low']:.4f}-{result['high']:.4f}), B better on "
          f"{result['b_better']} of {result['windows']} windows")


if __name__ == "__main__":
    main()
