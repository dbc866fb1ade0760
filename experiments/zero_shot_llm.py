"""Perplexity and lm-eval task scores of saved models side by side: one CSV row per (model,
metric), for the README's zero-shot table.

Models are given as NAME=DIR (a Hugging Face directory, e.g. one written by
`quality_time_llm.py --save-models`, or a .gguf file); rows already in the CSV are skipped.

    icbs make-cloze --text persuasion.txt northangerabbey.txt --out cloze --name austen_cloze
    python experiments/zero_shot_llm.py --models dense=MODEL.gguf wanda=models/wanda-... \
        --text persuasion.txt northangerabbey.txt --tasks austen_cloze --include-path cloze
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from icbs.llm.commands import text_perplexity
from icbs.llm.load import load_model
from icbs.llm.tasks import evaluate_tasks, task_manager
from icbs.threads import set_threads

FIELDS = ["model", "task", "metric", "value", "stderr", "items", "seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR")
    parser.add_argument("--text", nargs="+", required=True, metavar="FILE")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--include-path", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="experiments/results/llm/zero_shot.csv")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    models = dict(item.split("=", 1) for item in args.models)
    manager = task_manager(args.tasks, args.include_path)
    out = Path(args.out)
    rows = list(csv.DictReader(out.open())) if out.exists() else []
    done = {r["model"] for r in rows}
    for name, path in models.items():
        if name in done:
            continue
        model, tokenizer = load_model(path, "cpu")
        tic = time.perf_counter()
        ppl = text_perplexity(model, tokenizer, args.text, args.seqlen, args.max_tokens)
        new = [dict(model=name, task="text", metric="perplexity",
                    value=round(ppl["perplexity"], 4), stderr="",
                    items=ppl["scored_tokens"], seconds=round(time.perf_counter() - tic, 1))]
        tic = time.perf_counter()
        result = evaluate_tasks(model, tokenizer, args.tasks, include_path=args.include_path,
                                batch_size=args.batch_size, manager=manager)
        seconds = round(time.perf_counter() - tic, 1)
        new += [dict(model=name, task=r["task"], metric=r["metric"], value=round(r["value"], 4),
                     stderr="" if r["stderr"] is None else round(r["stderr"], 4),
                     items=r["samples"], seconds=seconds) for r in result["rows"]]
        for row in new:
            print(",".join(str(row[f]) for f in FIELDS), flush=True)
        rows += [{k: str(v) for k, v in row.items()} for row in new]
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
