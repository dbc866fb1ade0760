"""The `icbs prune` and `icbs eval` subcommands for causal language models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from ..layerwise import OBJECTIVES
from ..masks import PATTERN_HELP
from ..refit_steps import BATCH_ELEMENTS
from .data import BOS_CHOICES
from .prune import BUDGET_SHARES, INITS, METHODS, LLMPruneSettings

logger = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="Hugging Face model directory (safetensors) or a .gguf file")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch and of the solvers (default: their own choice)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per forward pass (default 8 when pruning, 1 in eval)")
    parser.add_argument("--cache-dir", default=None,
                        help="where a GGUF model is converted once (default ~/.cache/icbs/gguf)")
    parser.add_argument("--bos", choices=BOS_CHOICES, default="auto",
                        help="put the tokenizer's BOS token before every calibration and "
                             "evaluation window: auto (default) when the tokenizer adds one "
                             "(Gemma, LLaMA-2, Mistral), yes, or no (the SparseGPT/Wanda "
                             "convention)")


def add_commands(subparsers) -> None:
    """Register `prune` and `eval` on the `icbs` CLI's subparsers."""
    prune = subparsers.add_parser("prune", help="prune a causal LM one decoder block at a time")
    _common(prune)
    prune.add_argument("--method", choices=METHODS, default="icbs")
    prune.add_argument("--sparsity", type=float, default=None,
                       help="fraction pruned (default 0.5; an N:M pattern's own 1 - N/M)")
    prune.add_argument("--pattern", default="per_output", help=PATTERN_HELP)
    prune.add_argument("--calib", nargs="+", default=[], metavar="FILE",
                       help="plain-text calibration files")
    prune.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--budget", type=float, default=600.0,
                       help="seconds of iCBS block steps over the whole model (default 600; "
                            "with workers, wall seconds: each worker gets this much)")
    prune.add_argument("--steps", type=int, default=None,
                       help="iCBS block steps over the whole model instead of --budget "
                            "(shared out as the budget is; the result does not depend on time "
                            "or workers)")
    prune.add_argument("--budget-share", choices=BUDGET_SHARES, default="weights",
                       help="a decoder block's layers share its part of the iCBS budget by "
                            "weight count (weights, default) or by the start errors of the "
                            "layers in the same places of the block before (error); "
                            "error+blocks also shares the budget over the blocks by a "
                            "forecast of their errors (Wanda's on the dense model)")
    prune.add_argument("--workers", type=int, default=None,
                       help="prune a decoder block's layers in parallel on this many Ray "
                            "workers (a local Ray instance; needs the distributed extra)")
    prune.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="run the layers on the Ray cluster at ADDR instead (e.g. "
                            "ray://head:10001 or auto)")
    prune.add_argument("--init", choices=INITS, default="wanda", help="iCBS start (default wanda)")
    prune.add_argument("--objective", choices=OBJECTIVES, default="layerwise",
                       help="what iCBS block steps minimize: the layer error with the kept "
                            "weights frozen (layerwise, default) or after their least-squares "
                            "refit (refit; the result is refit)")
    prune.add_argument("--refit-batch-elements", type=int, default=BATCH_ELEMENTS,
                       help="--objective refit: rows step together in batches whose stacked "
                            f"inverses hold this many entries (default {BATCH_ELEMENTS}, "
                            "measured fastest on a CPU; larger batches may pay on a GPU)")
    prune.add_argument("--batched-steps", action="store_true",
                       help="layerwise objective, per_output or N:M: step a block in every row "
                            "of a batch of rows per solver call, cycling over the rows")
    prune.add_argument("--reconstruct", action="store_true",
                       help="least-squares update of the kept weights (alternating with iCBS)")
    prune.add_argument("--dense-targets", action="store_true",
                       help="fit every layer to the dense model's outputs (on the dense "
                            "model's inputs) rather than to the dense weights on the pruned "
                            "model's inputs, correcting the error made upstream; one more "
                            "forward pass per block, and a block's layers are taken in call "
                            "order as with --true-sequential")
    prune.add_argument("--true-sequential", action="store_true",
                       help="prune a decoder block's layers group by group in call order "
                            "(q/k/v, o, gate/up, down), each on the outputs of those pruned "
                            "before it (always so with --dense-targets)")
    prune.add_argument("--target-damp", type=float, default=0.1,
                       help="with --dense-targets: ridge pulling each layer's target toward its "
                            "dense weights, as a fraction of mean(diag H) (default 0.1; lower "
                            "fits the calibration outputs closer and over-fits: see the README)")
    prune.add_argument("--sparsegpt-columns", type=int, default=128,
                       help="columns SparseGPT prunes between lazy weight updates (its "
                            "`blocksize`, default 128; not the iCBS --block-size)")
    prune.add_argument("--mask-damp", type=float, default=0.1,
                       help="iCBS mask steps minimize the error under H + this x mean(diag H) I "
                            "(default 0.1; with --objective refit the ridge the masks are scored "
                            "under, the weights being refit with --percdamp; 0 fits the "
                            "calibration inputs exactly, which over-fits: see the README)")
    prune.add_argument("--percdamp", type=float, default=0.01,
                       help="damping as a fraction of mean(diag H) (default 0.01)")
    prune.add_argument("--block-size", type=int, default=256, help="iCBS block (QUBO variables)")
    prune.add_argument("--solver", default="anneal", help="iCBS block solver")
    prune.add_argument("--include", nargs="+", default=["*"], metavar="GLOB",
                       help="linear layers to prune, by full name (default: all in decoder blocks)")
    prune.add_argument("--exclude", nargs="+", default=[], metavar="GLOB",
                       help="linear layers to leave dense, by full name")
    prune.add_argument("--eval-text", nargs="+", default=[], metavar="FILE",
                       help="also report perplexity on these text files")
    prune.add_argument("--max-tokens", type=int, default=None, help="cap on evaluated tokens")
    prune.add_argument("--out", required=True,
                       help="output directory (written as .OUT.partial beside it, renamed at "
                            "the end; every pruned layer is checkpointed there)")
    prune.add_argument("--resume", action="store_true",
                       help="continue the killed or stopped run of the same command into --out")
    prune.set_defaults(func=run_prune)

    evaluate = subparsers.add_parser(
        "eval", help="perplexity on text files and/or lm-eval tasks of a causal LM")
    _common(evaluate)
    evaluate.add_argument("--text", nargs="+", default=[], metavar="FILE",
                          help="plain-text files to measure perplexity on")
    evaluate.add_argument("--max-tokens", type=int, default=None, help="cap on evaluated tokens")
    evaluate.add_argument("--tasks", nargs="+", default=[], metavar="NAME",
                          help="lm-evaluation-harness tasks (needs the eval extra), e.g. "
                               "hellaswag, or a local task such as one from make-cloze")
    evaluate.add_argument("--include-path", default=None, metavar="DIR",
                          help="directory of local lm-eval task YAML files")
    evaluate.add_argument("--limit", type=int, default=None,
                          help="score only the first N items of each task")
    evaluate.add_argument("--report", default="eval_report.json", metavar="FILE",
                          help="JSON report of the evaluation (default eval_report.json)")
    evaluate.set_defaults(func=run_eval)

    cloze = subparsers.add_parser(
        "make-cloze", help="write a LAMBADA-style cloze task for lm-eval from plain-text books",
        description="Passages of the books whose last word (a whole word ending a sentence "
                    "and already used in the passage) is to be predicted from the rest; "
                    "writes OUT/NAME.jsonl and OUT/NAME.yaml for `icbs eval --tasks NAME "
                    "--include-path OUT`.")
    cloze.add_argument("--text", nargs="+", required=True, metavar="FILE")
    cloze.add_argument("--out", required=True, metavar="DIR")
    cloze.add_argument("--name", default="cloze", help="task name (default cloze)")
    cloze.add_argument("--items", type=int, default=1000, help="passages (default 1000)")
    cloze.add_argument("--seed", type=int, default=0)
    cloze.add_argument("--min-context", type=int, default=50,
                       help="fewest context words before the target (default 50)")
    cloze.add_argument("--max-context", type=int, default=150,
                       help="most context words before the target (default 150)")
    cloze.set_defaults(func=run_make_cloze)


def _setup(args) -> None:
    """Check the flags every command shares (before anything is loaded or written)."""
    from ..checks import flag_at_least
    from ..threads import set_threads
    from .load import choose_device

    flag_at_least("--threads", args.threads, 1)
    flag_at_least("--batch-size", args.batch_size, 1)
    flag_at_least("--seqlen", args.seqlen, 2)
    flag_at_least("--max-tokens", args.max_tokens, 2)
    choose_device(args.device)
    if args.threads:
        set_threads(args.threads)


def text_perplexity(model, tokenizer, paths, seqlen: int, max_tokens: int | None,
                    batch_size: int = 1, progress: bool = False, bos: str = "auto") -> dict:
    """Perplexity on text files with the settings that produced it; `model` is a loaded model
    or an `icbs.llm.lazy.LazyModel` (evaluated one decoder block at a time)."""
    from .data import eval_windows, read_text, resolve_bos, tokenize
    from .evaluate import nll_perplexity, window_nll
    from .lazy import LazyModel

    bos_id = resolve_bos(tokenizer, bos)
    tokens = tokenize(tokenizer, read_text(paths), bos_id)
    windows = eval_windows(tokens, seqlen, max_tokens, bos_id)
    tic = time.perf_counter()
    nll = model.window_nll(windows, batch_size) if isinstance(model, LazyModel) else \
        window_nll(model, windows, batch_size, progress=progress)
    return {"perplexity": nll_perplexity(nll), "text": [str(p) for p in paths],
            "seqlen": seqlen, "bos": bos, "bos_token_id": bos_id, "windows": len(windows),
            "scored_tokens": len(windows) * (windows.shape[1] - 1),
            "window_nll": nll.tolist(), "seconds": time.perf_counter() - tic}


def run_prune(args) -> None:
    from ..checks import flag_at_least
    from .data import read_text
    from .lazy import LazyModel, ShardWriter, bound_heap, peak_memory
    from .load import choose_device, resolve_model_dir

    _setup(args)
    settings = LLMPruneSettings(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, budget=args.budget,
        init=args.init, reconstruct=args.reconstruct, sparsegpt_columns=args.sparsegpt_columns,
        percdamp=args.percdamp, mask_damp=args.mask_damp, block_size=args.block_size,
        solver=args.solver,
        include=tuple(args.include), exclude=tuple(args.exclude),
        batch_size=8 if args.batch_size is None else args.batch_size, bos=args.bos,
        objective=args.objective, steps=args.steps, batched_steps=args.batched_steps,
        refit_batch_elements=args.refit_batch_elements, dense_targets=args.dense_targets,
        target_damp=args.target_damp, true_sequential=args.true_sequential,
        budget_share=args.budget_share)
    flag_at_least("--workers", args.workers, 1)
    if args.workers is not None and args.ray_address is not None:
        raise ValueError("give --workers (a local Ray instance) or --ray-address (a cluster), "
                         "not both")
    if settings.needs_calibration:
        read_text(args.calib)  # missing files fail before the model is loaded
    if args.eval_text:
        read_text(args.eval_text)
    from .prune import Interrupted, LayerPruner, prune_model
    from .run_dir import RunDirectory

    identity = {"settings": dataclasses.asdict(settings), "model": str(args.model),
                "calib": [str(p) for p in args.calib]}
    run = RunDirectory(args.out, identity, args.resume)
    restored = run.restored()
    bound_heap()
    tic = time.perf_counter()
    from transformers import AutoTokenizer

    from ..distributed import make_executor

    model_dir = resolve_model_dir(args.model, args.cache_dir)
    device = choose_device(args.device)
    lazy = LazyModel(model_dir, device)
    lazy.weights.check_finite([n for names in lazy.block_names for n in names])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_seconds = time.perf_counter() - tic
    shards = ShardWriter(run.work, len(lazy.blocks) + 1)
    executor = make_executor(args.workers, args.ray_address)
    made = []

    def layer_pruner(settings, shapes):
        made.append(LayerPruner(settings, shapes, restored=restored,
                                on_layer=run.save_layer, executor=executor, keep_masks=False))
        return made[0]

    def block_done(index):
        run.open()
        shards.write(index, lazy.stored(lazy.block_names[index]))
        lazy.release_block(index)

    def stop(signum, frame):
        for pruner in made:
            pruner.stop_requested = True
        print("\nstopping after the current layer (Ctrl-C again to abort)", file=sys.stderr)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        report = prune_model(lazy.model, tokenizer, settings, args.calib,
                             layer_pruner=layer_pruner, progress=sys.stderr.isatty(),
                             load_block=lazy.load_block, block_done=block_done,
                             release_block=lazy.release_block)
    except Interrupted:
        print(f"stopped: {len(run.records)} layers are checkpointed in {run.work}; the same "
              f"command with --resume continues", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        executor.close()
    tic = time.perf_counter()
    run.open()
    shards.write(len(lazy.blocks), lazy.stored(lazy.outer_names))
    shards.finish()
    lazy.model.config.save_pretrained(run.work)
    if (model_dir / "generation_config.json").is_file():
        shutil.copy(model_dir / "generation_config.json", run.work)
    save_seconds = time.perf_counter() - tic
    report["seconds"]["load"] = load_seconds
    report["resumed_layers"] = len(restored)
    report.pop("masks")  # empty: the masks are in the checkpoint, written below
    report.update(model=str(args.model), device=str(device), threads=torch.get_num_threads(),
                  workers=executor.parallel if args.workers or args.ray_address else None)
    if args.eval_text:
        report["eval"] = text_perplexity(LazyModel(run.work, device), tokenizer, args.eval_text,
                                         args.seqlen, args.max_tokens, args.batch_size or 1,
                                         bos=args.bos)
        print(f"perplexity {report['eval']['perplexity']:.4f}")

    def write(directory: Path) -> None:
        tic = time.perf_counter()
        tokenizer.save_pretrained(directory)
        run.write_masks(directory / "masks.safetensors")
        report["seconds"]["save"] = save_seconds + time.perf_counter() - tic
        report["memory"] = peak_memory(device)
        (directory / "report.json").write_text(json.dumps(report, indent=2))

    run.finish(write)
    print(f"pruned {len(report['layers'])} layers to sparsity {report['sparsity']:.4f} in "
          f"{report['seconds']['prune']:.1f} s; saved to {run.out}")


def run_eval(args) -> None:
    from ..checks import flag_at_least
    from .data import read_text
    from .load import load_model

    _setup(args)
    if not args.text and not args.tasks:
        raise ValueError("give --text FILE ... (perplexity), --tasks NAME ... (lm-eval), or both")
    flag_at_least("--limit", args.limit, 1)
    report_path = Path(args.report)
    if report_path.is_dir() or not report_path.parent.is_dir():
        raise ValueError(f"--report {report_path} must be a file in an existing directory")
    if args.text:
        read_text(args.text)
    if args.tasks:
        from .tasks import task_manager

        manager = task_manager(args.tasks, args.include_path)  # lm-eval there, tasks known
    model, tokenizer = load_model(args.model, args.device, args.cache_dir)
    report = {"model": str(args.model), "bos": args.bos}
    if args.text:
        result = text_perplexity(model, tokenizer, args.text, args.seqlen, args.max_tokens,
                                 args.batch_size or 1, bos=args.bos,
                                 progress=sys.stderr.isatty())
        report["perplexity"] = result
        print(f"perplexity {result['perplexity']:.4f} over {result['scored_tokens']} tokens "
              f"({result['windows']} windows of {args.seqlen})")
    if args.tasks:
        from .tasks import evaluate_tasks, format_rows

        tic = time.perf_counter()
        report["tasks"] = evaluate_tasks(model, tokenizer, args.tasks,
                                         include_path=args.include_path, limit=args.limit,
                                         batch_size=args.batch_size or 1, bos=args.bos,
                                         manager=manager)
        report["tasks"]["seconds"] = time.perf_counter() - tic
        print(format_rows(report["tasks"]["rows"]))
    partial = report_path.with_name(report_path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(report_path)


def run_make_cloze(args) -> None:
    from .cloze import make_cloze

    summary = make_cloze(args.text, args.out, name=args.name, items=args.items,
                         seed=args.seed, min_context=args.min_context,
                         max_context=args.max_context)
    short = "" if summary["items"] == args.items else (
        f" (asked for {args.items}; only {summary['items']} passages qualify)")
    print(f"wrote {summary['items']} passages{short} to {summary['data']}; score them with "
          f"icbs eval --model MODEL --tasks {args.name} --include-path {args.out}")
