"""Zero-shot tasks through lm-evaluation-harness on a model and tokenizer already loaded.

A thin bridge: our loader (GGUF or safetensors directories) gives the model, lm-eval's
`HFLM(pretrained=model, tokenizer=...)` wraps it and `simple_evaluate` scores the tasks; the
standard tasks need their data from the Hugging Face hub, local ones (`icbs make-cloze`, or
any task YAML with `dataset_path: json`) come from `include_path`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

INSTALL = "pip install 'icbs[eval]' (lm-eval 0.4.13)"
BOS_TOKEN = {"auto": None, "yes": True, "no": False}  # --bos -> HFLM's add_bos_token


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager with `include_path`, after checking that every task exists and
    that lm-eval can load its files (ValueError otherwise)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(f"--tasks needs lm-eval: {INSTALL}") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path} is not a directory of task files")
    include = None if include_path is None else str(include_path)
    # Indexing lm-eval's own ~15k tasks takes seconds: skipped when every task is local.
    manager = None if include is None else TaskManager(include_path=include,
                                                       include_defaults=False)
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include)
    for name in tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            where = f" in lm-eval or in {include_path}" if include_path else (
                " in lm-eval (a local task needs --include-path)")
            raise ValueError(f"unknown task {name!r}{where}{hint}")
    try:
        manager.load(list(tasks))
    except Exception as exc:  # a task file lm-eval cannot read; its own words say which field
        raise ValueError(f"lm-eval could not load task(s) {', '.join(tasks)}: "
                         f"{type(exc).__name__}: {exc}") from None
    return manager


def metric_rows(results: dict) -> list[dict]:
    """lm-eval's results as one row per (task, metric): "acc" and "acc_norm" stay separate
    rows under their own names; a filter other than "none" is named after the metric."""
    rows = []
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric if filt == "none" else
                         f"{metric} ({filt})", "value": float(value),
                         "stderr": None if stderr in (None, "N/A") else float(stderr),
                         "samples": values.get("sample_len")})
    return rows


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], *,
                   include_path: str | Path | None = None, limit: int | None = None,
                   batch_size: int = 1, bos: str = "auto", bootstrap_iters: int = 1000,
                   manager=None) -> dict:
    """Score `tasks` with lm-eval; returns {"rows": metric_rows, "lm_eval_version", "limit",
    "n_samples"}. Unknown tasks and task files lm-eval cannot read raise ValueError (from
    `task_manager`, whose result for these tasks may be passed as `manager`) before the
    model runs."""
    if bos not in BOS_TOKEN:
        raise ValueError(f"bos must be one of {tuple(BOS_TOKEN)}, got {bos!r}")
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("lm-eval needs a tokenizer with a BOS or an EOS token (it starts "
                         "empty contexts with one); this tokenizer has neither")
    manager = manager or task_manager(tasks, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warning on passing a model
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              add_bos_token=BOS_TOKEN[bos])
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                      limit=limit, log_samples=False,
                                      bootstrap_iters=bootstrap_iters)
    return {"rows": metric_rows(results["results"]), "lm_eval_version":
            results.get("lm_eval_version"), "limit": limit, "n_samples": results["n-samples"]}


def format_rows(rows: list[dict]) -> str:
    """The rows as an aligned text table: task, metric, value, stderr."""
    lines = [("task", "metric", "value", "stderr")] + [
        (r["task"], r["metric"], f"{r['value']:.4f}",
         "" if r["stderr"] is None else f"{r['stderr']:.4f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in lines)
