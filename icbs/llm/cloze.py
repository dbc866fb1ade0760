"""A LAMBADA-style cloze task from any plain-text books, written for lm-evaluation-harness.

A passage is a run of whole sentences of one book; its last word, the target, is to be
predicted from the rest. As in LAMBADA (Paperno et al. 2016), targets are whole words ending
a sentence and the context is long (at least `min_context` words), and, standing in for
LAMBADA's human filter that kept passages guessable only from the wider context, the target
must already occur in the context (case-insensitively) and is not an abbreviation such as
"Mr". Passages are drawn at random (seeded) among the candidates; each has its own target
sentence, but two passages may share context sentences (two books of 160k words give about
1,100 candidates, too few for 1,000 passages that never overlap). This is a measure of our
own making, not LAMBADA: its figures compare models with each other only.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from ..checks import integer_at_least, output_directory
from .data import read_text

SENTENCE_END = re.compile(r"^(?P<word>[A-Za-z]+)[.!?]+[\"'\u2019\u201d)]*$")
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "esq", "messrs", "col", "capt", "rev"}

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  made_by: icbs make-cloze
"""


def cloze_passages(words: Sequence[str], min_context: int = 50, max_context: int = 150
                   ) -> list[tuple[int, int, str]]:
    """Every candidate passage of a word sequence as (first word, target position, target):
    the target ends a sentence, the context is the whole sentences before it that make at
    least `min_context` words (those of at most `max_context` words qualify)."""
    ends = [i for i, word in enumerate(words) if SENTENCE_END.match(word)]
    starts = [0] + [i + 1 for i in ends]  # the first word of every sentence
    found = []
    for target in ends:
        word = SENTENCE_END.match(words[target])["word"]
        if len(word) < 2 or word.lower() in ABBREVIATIONS:
            continue
        # the latest sentence start leaving at least min_context words before the target
        first = next((s for s in reversed(starts) if s <= target - min_context), None)
        if first is None or target - first > max_context:
            continue
        context = {re.sub(r"[^a-z]", "", w.lower()) for w in words[first:target]}
        if word.lower() in context:
            found.append((first, target, word))
    return found


def make_cloze(paths: Sequence[str | Path], out: str | Path, *, name: str = "cloze",
               items: int = 1000, seed: int = 0, min_context: int = 50,
               max_context: int = 150) -> dict:
    """Write `items` passages (fewer when fewer qualify) from the books as `out/NAME.jsonl`
    and the task `out/NAME.yaml` (lm-eval: `--tasks NAME --include-path out`); returns a
    summary (items written, candidates found per book)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"task name {name!r} must be letters, digits and _, starting with a "
                         f"letter")
    integer_at_least("--items", items, 1)
    if not 1 <= min_context <= max_context:
        raise ValueError(f"need 1 <= min_context <= max_context, got {min_context}, "
                         f"{max_context}")
    output_directory("--out", out)
    out = Path(out)
    candidates, found = [], {}
    for path in paths:
        words = read_text([path]).split()
        passages = cloze_passages(words, min_context, max_context)
        found[str(path)] = len(passages)
        candidates += [(str(path), words, p) for p in passages]
    chosen = random.Random(seed).sample(range(len(candidates)), min(items, len(candidates)))
    lines = []
    for index in sorted(chosen):  # in the books' order
        book, words, (first, target, word) = candidates[index]
        lines.append(json.dumps({"text": " ".join(words[first:target] + [word]),
                                 "target": word, "book": Path(book).name}) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    data = (out / f"{name}.jsonl").resolve()
    data.write_text("".join(lines))
    (out / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=json.dumps(str(data))))
    return {"task": name, "items": len(lines), "asked": items, "candidates": found,
            "seed": seed, "min_context": min_context, "max_context": max_context,
            "data": str(data)}
