"""Scale: peak memory against model depth, Ray workers, and batched block steps.

Parts (`--parts`, each writes its own CSV under --out):

memory   Random-weight LLaMA-shaped models built here (hidden 1024, MLP 2816, 16 heads, the
         SmolLM2 tokenizer and vocabulary, tied embeddings) with 8, 16 and 32 decoder blocks,
         saved as sharded safetensors, pruned by `icbs prune` (one process per run) with
         Wanda, SparseGPT and iCBS; the peak RSS `report.json` records, per depth.
workers  iCBS on SmolLM2 (`--model`) through `icbs prune` with 1 and 2 Ray workers at the same
         wall budget: block steps per wall second of pruning and the summed layer error.
batched  One SmolLM2 layer (the dense model's inputs): block steps per second of the one-block
         path against the batched path, side by side, per solver and block size, and the
         layer error each reaches with the same number of steps.

    python experiments/scale_llm.py --model MODEL.gguf --calib emma.txt --out \
        experiments/results/scale
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from icbs.report import write_csv


def build_random_llama(directory: Path, blocks: int, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A LLaMA-shaped model with random weights, sharded safetensors (once per depth)."""
    if (directory / "config.json").is_file():
        return directory
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=blocks, num_attention_heads=16,
                         num_key_value_heads=16, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(partial, max_shard_size="200MB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(partial)
    partial.rename(directory)
    return directory


def prune_run(model: Path, out: Path, method: str, args, *extra: str) -> dict:
    """`icbs prune` in a process of its own; its report."""
    command = [sys.executable, "-m", "icbs.cli", "prune", "--model", str(model),
               "--method", method, "--calib", *args.calib, "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--threads", str(args.threads), "--out", str(out),
               *extra]
    tic = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    report["wall"] = time.perf_counter() - tic
    return report


def disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def memory_part(args, tokenizer_dir: Path) -> list[dict]:
    rows = []
    for blocks in args.depths:
        model = build_random_llama(args.work / f"llama-{blocks}", blocks, tokenizer_dir)
        params = sum(t.numel() for t in _tensors_meta(model))
        for method in args.methods:
            out = args.work / f"pruned-{blocks}-{method}"
            extra = ["--budget", str(args.budget)] if method == "icbs" else []
            report = prune_run(model, out, method, args, *extra)
            rows.append({"blocks": blocks, "parameters": params,
                         "model_bytes": disk_bytes(model), "method": method,
                         "peak_rss_mb": report["memory"]["peak_rss_bytes"] / 2**20,
                         "prune_seconds": report["seconds"]["prune"],
                         "wall_seconds": report["wall"], "sparsity": report["sparsity"]})
            print(rows[-1], flush=True)
            shutil.rmtree(out)
    return rows


def _tensors_meta(directory: Path):
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                yield torch.empty(handle.get_slice(name).get_shape(), device="meta")


def workers_part(args, model: Path) -> list[dict]:
    rows = []
    for workers in args.workers:
        out = args.work / f"smollm2-workers-{workers}"
        report = prune_run(model, out, "icbs", args, "--budget", str(args.budget),
                           "--workers", str(workers), "--pattern", "per_output")
        layers = report["layers"]
        steps = sum(r["steps"] for r in layers)
        rows.append({"workers": workers, "budget": args.budget,
                     "prune_seconds": report["seconds"]["prune"], "steps": steps,
                     "steps_per_wall_second": steps / report["seconds"]["prune"],
                     "error_before": sum(r["error_before"] for r in layers),
                     "error_after": sum(r["error_after"] for r in layers),
                     "peak_rss_mb": report["memory"]["peak_rss_bytes"] / 2**20})
        print(rows[-1], flush=True)
        shutil.rmtree(out)
    return rows


def batched_part(args, model: Path) -> list[dict]:
    from icbs.baselines import wanda_mask
    from icbs.layerwise import improve_layer
    from icbs.llm.data import calibration_windows, read_text, resolve_bos, tokenize
    from icbs.llm.load import load_model
    from icbs.llm.sequential import per_layer, prune_sequential
    from icbs.threads import set_threads

    set_threads(args.threads)
    dense, tokenizer = load_model(model, "cpu")
    bos = resolve_bos(tokenizer)
    windows = calibration_windows(tokenize(tokenizer, read_text(args.calib), bos),
                                  args.nsamples, args.seqlen, 0, bos)
    seen = {}

    def record(name, module, cov):
        seen[name] = (module.weight.detach().float().clone(), cov.hessian.clone())
        return {}

    prune_sequential(dense, windows, per_layer(record), include=[args.layer], progress=False)
    w0, h = seen[args.layer]
    mask = wanda_mask(w0, torch.sqrt(torch.diagonal(h)), 0.5, "per_output")
    rows = []
    for solver in args.solvers:
        for block in args.block_sizes:
            results = {}
            for batched in (False, True):  # side by side, the same steps
                result = improve_layer(w0, h, mask, pattern="per_output", sparsity=0.5,
                                       steps=args.batched_steps, block_size=block,
                                       solver=solver, mask_damp=0.1, batched=batched)
                results[batched] = result
                rows.append({"layer": args.layer, "shape": "x".join(map(str, w0.shape)),
                             "solver": solver, "block_size": block,
                             "path": "batched" if batched else "one block",
                             "steps": result.steps, "seconds": result.step_seconds,
                             "steps_per_second": result.steps / result.step_seconds,
                             "error_before": result.error_before,
                             "error_after": result.error_after})
                print(rows[-1], flush=True)
            rows[-1]["speedup"] = rows[-1]["steps_per_second"] / rows[-2]["steps_per_second"]
            rows[-2]["speedup"] = 1.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="SmolLM2 (.gguf or directory)")
    parser.add_argument("--calib", nargs="+", required=True)
    parser.add_argument("--out", default="experiments/results/scale")
    parser.add_argument("--work", default=None,
                        help="where the random models and outputs go (default OUT/work)")
    parser.add_argument("--parts", nargs="+", default=["memory", "workers", "batched"],
                        choices=["memory", "workers", "batched"])
    parser.add_argument("--depths", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "icbs"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer", default="model.layers.3.self_attn.q_proj")
    parser.add_argument("--solvers", nargs="+", default=["greedy", "anneal"])
    parser.add_argument("--block-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--batched-steps", type=int, default=2304,
                        help="block steps per path in the batched part (4 per row of q_proj)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = Path(args.work) if args.work else out / "work"
    args.work.mkdir(parents=True, exist_ok=True)
    from icbs.llm.load import resolve_model_dir

    smollm2 = resolve_model_dir(args.model)
    parts = {"memory": lambda: memory_part(args, smollm2),
             "workers": lambda: workers_part(args, smollm2),
             "batched": lambda: batched_part(args, smollm2)}
    for part in args.parts:
        write_csv(out / f"{part}.csv", parts[part]())


if __name__ == "__main__":
    main()
