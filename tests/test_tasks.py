"""Zero-shot tasks through lm-eval on a tiny LLaMA, checked against our own log-likelihoods,
and the cloze builder on a text written here."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from test_bad_input import _refused  # noqa: E402
from test_llm import _tiny_llama_dir  # noqa: E402

from icbs.cli import main  # noqa: E402
from icbs.llm.cloze import cloze_passages, make_cloze  # noqa: E402
from icbs.llm.load import load_model  # noqa: E402
from icbs.llm.tasks import evaluate_tasks  # noqa: E402

ITEMS = [
    ("The road to the village ran between", ["wet hedges", "the mill", "ducks"], 0),
    ("Miss Taylor had walked it many", ["times", "gates and stiles", "days"], 0),
    ("It will rain before", ["noon", "the ball", "Thursday next"], 0),
    ("The miller's wife waved from the", ["door", "bank", "bridge over the water"], 0),
    ("The children ran along the bank, shouting at the", ["ducks", "birds", "brother"], 0),
    ("By evening the house was full of", ["visitors", "talk", "grey rain"], 0),
]

MC_YAML = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def choice_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}) + "\n"
                            for q, c, g in ITEMS))
    (root / "tiny_choice.yaml").write_text(MC_YAML.format(data=json.dumps(str(data))))
    return root


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether every continuation token is the argmax,
    from the model's logits directly."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double().log_softmax(-1)
    targets = torch.tensor(whole[start:])
    rows = logits[start - 1:]
    return float(rows[torch.arange(len(targets)), targets].sum()), bool(
        (rows.argmax(-1) == targets).all())


@pytest.mark.parametrize("bos", [False, True])
def test_multiple_choice_accuracy_equals_our_own_loglikelihoods(tmp_path, choice_task, bos):
    model, tokenizer = load_model(_tiny_llama_dir(tmp_path / "m", bos=bos), "cpu")
    result = evaluate_tasks(model, tokenizer, ["tiny_choice"], include_path=choice_task)
    got = {r["metric"]: r["value"] for r in result["rows"]}
    assert set(got) == {"acc", "acc_norm"}
    hits = hits_norm = 0
    for question, choices, gold in ITEMS:
        lls = [_loglikelihood(model, tokenizer, question, " " + c)[0] for c in choices]
        hits += max(range(len(choices)), key=lls.__getitem__) == gold
        hits_norm += max(range(len(choices)), key=lambda i: lls[i] / len(choices[i])) == gold
    assert got["acc"] == hits / len(ITEMS)
    assert got["acc_norm"] == hits_norm / len(ITEMS)


BOOK = (
    "Anne walked to the gate. She had known the gate since she was a child, and the old "
    "gardener had painted it green every spring. Mr. Elliot said nothing of the garden. "
    "The rain came on at noon, and the path by the wall was soon a stream of brown water "
    "running down to the road, where the carts stood waiting for the rain to stop. Anne "
    "stood a long time under the trees and thought of the years that had passed since "
    "she first came through the gate. She turned back towards the house at last, past "
    "the wall and the old trees, and at the door she looked once more at the gate."
)


def test_cloze_passages_end_a_sentence_with_a_word_of_their_context(tmp_path):
    words = BOOK.split()
    passages = cloze_passages(words, min_context=40, max_context=120)
    assert passages, "the text has qualifying passages"
    for first, target, word in passages:
        assert words[target].rstrip(".!?") == word and words[target][-1] in ".!?"
        assert target - first >= 40 and (first == 0 or words[first - 1][-1] in ".!?")
        assert word.lower() in " ".join(words[first:target]).lower()
        assert word != "Mr"
    # "gate." ends the last sentence and "gate" is in its context; "nothing ... garden."
    # does not qualify: "garden" is not used before it
    assert (words.index("garden.") not in {t for _, t, _ in passages})
    assert len(words) - 1 in {t for _, t, _ in passages}


def test_make_cloze_writes_a_task_the_harness_scores_as_our_greedy_check(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(BOOK + "\n\n" + BOOK.replace("Anne", "Mary") + "\n")
    summary = make_cloze([book], tmp_path / "task", name="tiny_cloze", items=3, seed=1,
                         min_context=40, max_context=120)
    again = make_cloze([book], tmp_path / "again", name="tiny_cloze", items=3, seed=1,
                       min_context=40, max_context=120)
    assert summary["items"] == 3
    lines = (tmp_path / "task" / "tiny_cloze.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "again" / "tiny_cloze.jsonl").read_text().splitlines()
    assert again["candidates"] == summary["candidates"]
    items = [json.loads(line) for line in lines]
    for item in items:
        assert item["text"].split(" ")[-1] == item["target"]
    model, tokenizer = load_model(_tiny_llama_dir(tmp_path / "m", bos=False), "cpu")
    result = evaluate_tasks(model, tokenizer, ["tiny_cloze"], include_path=tmp_path / "task")
    got = {r["metric"]: r["value"] for r in result["rows"]}
    direct = [_loglikelihood(model, tokenizer, " ".join(item["text"].split(" ")[:-1]),
                             " " + item["target"]) for item in items]
    assert got["acc"] == sum(greedy for _, greedy in direct) / len(items)
    mean_ll = sum(ll for ll, _ in direct) / len(items)
    assert got["perplexity"] == pytest.approx(math.exp(-mean_ll), rel=1e-5)


def test_eval_cli_reports_tasks_and_perplexity(tmp_path, choice_task, capsys):
    from test_llm import TEXT

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    report = tmp_path / "report.json"
    main(["eval", "--model", str(_tiny_llama_dir(tmp_path / "m", bos=False)), "--text",
          str(text), "--tasks", "tiny_choice", "--include-path", str(choice_task), "--limit",
          "4", "--seqlen", "64", "--report", str(report)])
    out = capsys.readouterr().out
    assert "perplexity" in out and "acc_norm" in out
    saved = json.loads(report.read_text())
    assert saved["perplexity"]["perplexity"] > 1
    assert {r["metric"] for r in saved["tasks"]["rows"]} == {"acc", "acc_norm"}
    assert saved["tasks"]["n_samples"]["tiny_choice"]["effective"] == 4


@pytest.mark.parametrize("write,argv,match", [
    (None, ["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (None, ["--tasks", "tiny_choice", "--include-path", "missing"], "not a directory"),
    ("output_type: wrongtype", ["--tasks", "bad_task"], "invalid output_type 'wrongtype'"),
    ("test_split: nosplit", ["--tasks", "bad_task"], "could not load task"),
    (None, ["--tasks", "tiny_choice", "--limit", "0"], "--limit must be >= 1"),
    (None, [], "give --text FILE"),
])
def test_eval_cli_refuses_bad_tasks_before_loading_the_model(tmp_path, choice_task, capsys,
                                                             write, argv, match):
    include = ["--include-path", str(choice_task)]
    if write is not None:
        yaml = (choice_task / "tiny_choice.yaml").read_text().replace(
            "task: tiny_choice", "task: bad_task")
        key = write.split(":")[0]
        yaml = "\n".join(write if line.startswith(key + ":") else line
                         for line in yaml.splitlines())
        (tmp_path / "bad_task.yaml").write_text(yaml)
        include = ["--include-path", str(tmp_path)]
    if "--include-path" in argv:
        include = []
        argv = [str(tmp_path / a) if a == "missing" else a for a in argv]
    report = tmp_path / "report.json"
    _refused(["eval", "--model", tmp_path / "no_model", *argv, *include, "--report", report],
             capsys, match)
    assert not report.exists()


def test_make_cloze_refuses_bad_arguments(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(BOOK)
    _refused(["make-cloze", "--text", book, "--out", tmp_path / "o", "--name", "a b"], capsys,
             "task name 'a b'")
    _refused(["make-cloze", "--text", book, "--out", tmp_path / "o", "--items", "0"], capsys,
             "--items must be an integer >= 1")
    _refused(["make-cloze", "--text", book, "--out", book], capsys, "is an existing file")
    _refused(["make-cloze", "--text", tmp_path / "none.txt", "--out", tmp_path / "o"], capsys,
             "text file not found")


def test_tasks_without_lm_eval_say_how_to_install_it(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    _refused(["eval", "--model", tmp_path / "m", "--tasks", "hellaswag"], capsys,
             r"--tasks needs lm-eval: pip install 'icbs\[eval\]'")
