"""The LLM pipeline on a GPU: CUDA gives what the CPU gives, and absolute times there.

1. A tiny LLaMA (float32, random weights, a character tokenizer) pruned on the CPU and on
   CUDA with the same calibration windows, every method (ALPS, the refit steps and dense
   targets too): magnitude and Wanda masks must be identical, the others nearly so; every
   method keeps the pattern exactly and leaves finite weights, zero where pruned.
2. SmolLM2-135M's shape (its config.json and tokenizer, random bfloat16 weights: the hub's
   checkpoint dtype) pruned through `icbs prune --device cuda` with every method: time per
   phase, peak GPU memory, exact sparsity, and `icbs eval` on the saved directory
   reproducing the report's perplexity (meaningless in value: the weights are random).

    python experiments/gpu_check.py --config DIR --calib a.txt --eval b.txt --out DIR

`--parts tiny` runs the first part alone (no --config needed). The real SmolLM2 on CUDA is
`experiments/quality_time_llm.py --device cuda`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from icbs.cli import main as icbs_main
from icbs.llm.commands import text_perplexity
from icbs.llm.load import load_model
from icbs.llm.prune import LLMPruneSettings, prunable_layers, prune_model
from icbs.masks import mask_matches_pattern, parse_pattern

METHODS = {  # name -> `icbs prune` arguments
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt"],
    "icbs": ["--method", "icbs", "--init", "wanda"],
    "icbs+rec": ["--method", "icbs", "--init", "sparsegpt", "--reconstruct"],
}


def tiny_model(path: Path, text: str) -> None:
    chars = sorted(set(text))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


# (label, LLMPruneSettings fields) pruned on both devices; the refit steps get a step count,
# not a time budget, so that both devices do the same work
CPU_VERSUS_CUDA = [
    ("magnitude", dict(method="magnitude", pattern="per_output")),
    ("wanda", dict(method="wanda", pattern="per_output")),
    ("wanda", dict(method="wanda", pattern="2:4")),
    ("sparsegpt", dict(method="sparsegpt", pattern="per_output")),
    ("sparsegpt", dict(method="sparsegpt", pattern="2:4")),
    ("alps", dict(method="alps", pattern="per_output")),
    ("alps", dict(method="alps", pattern="2:4")),
    ("icbs", dict(method="icbs", pattern="2:4", budget=5.0)),
    ("icbs+refit", dict(method="icbs", pattern="per_output", init="sparsegpt",
                        objective="refit", steps=300)),
    ("sparsegpt dense targets", dict(method="sparsegpt", pattern="per_output",
                                     dense_targets=True)),
    ("alps dense targets", dict(method="alps", pattern="2:4", dense_targets=True)),
    ("icbs+refit dense targets", dict(method="icbs", pattern="per_output", init="sparsegpt",
                                      objective="refit", steps=300, dense_targets=True)),
]


def cpu_versus_cuda(model_dir: Path, calib: list[str]) -> list[dict]:
    """Every method on the tiny model on both devices: the masks' agreement and the summed
    layer errors (against the pruned or the dense stream's outputs) side by side."""
    rows = []
    for label, fields in CPU_VERSUS_CUDA:
        settings = LLMPruneSettings(sparsity=0.5, nsamples=16, seqlen=128, **fields)
        masks, errors, seconds = {}, {}, {}
        for device in ("cpu", "cuda"):
            model, tokenizer = load_model(model_dir, device)
            tic = time.perf_counter()
            report = prune_model(model, tokenizer, settings, calib, progress=False)
            seconds[device] = round(time.perf_counter() - tic, 2)
            masks[device] = report["masks"]
            errors[device] = sum(r.get("error_dense", r.get("error_after", 0.0))
                                 for r in report["layers"])
            for name, mask in report["masks"].items():
                assert mask_matches_pattern(mask, parse_pattern(settings.pattern), 0.5), \
                    (label, name)
            for name, layer in prunable_layers(model, settings).items():
                assert torch.isfinite(layer.weight).all(), (label, name)
                assert not layer.weight[~masks[device][name].to(layer.weight.device)].any(), \
                    (label, name, "a pruned weight is not zero")
        agree = [float((masks["cpu"][n] == masks["cuda"][n]).float().mean()) for n in masks["cpu"]]
        rows.append(dict(method=label, pattern=settings.pattern, mask_agreement_min=min(agree),
                         error_cpu=errors["cpu"], error_cuda=errors["cuda"],
                         seconds_cpu=seconds["cpu"], seconds_cuda=seconds["cuda"]))
        print(rows[-1], flush=True)
        if settings.method in ("magnitude", "wanda"):
            assert min(agree) == 1.0, f"{label} masks differ between CPU and CUDA"
    return rows


def smol_shaped(config_dir: Path, path: Path) -> None:
    config = AutoConfig.from_pretrained(config_dir)
    config.dtype = torch.bfloat16
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(path)


def cuda_runs(model_dir: Path, calib: list[str], evals: list[str], out: Path,
              budget: float) -> list[dict]:
    rows = []
    for pattern in ("per_output", "2:4"):
        for method, arguments in METHODS.items():
            run_dir = out / f"{method}_{pattern.replace(':', 'of')}"
            torch.cuda.reset_peak_memory_stats()
            tic = time.perf_counter()
            icbs_main(["prune", "--model", str(model_dir), "--device", "cuda", *arguments,
                       "--pattern", pattern, "--sparsity", "0.5", "--calib", *calib,
                       "--nsamples", "128", "--seqlen", "512", "--budget", str(budget),
                       "--eval-text", *evals, "--max-tokens", "16384", "--out", str(run_dir)])
            wall = time.perf_counter() - tic
            peak = torch.cuda.max_memory_allocated() / 2**30
            report = json.loads((run_dir / "report.json").read_text())
            model, tokenizer = load_model(run_dir, "cuda")
            again = text_perplexity(model, tokenizer, evals, 512, 16384, progress=False)
            del model
            sparsities = [r["sparsity"] for r in report["layers"]]
            rows.append(dict(
                method=method, pattern=pattern, wall_s=round(wall, 1),
                seconds={k: round(v, 1) for k, v in report["seconds"].items()},
                peak_gpu_gib=round(peak, 2), layers=len(sparsities),
                sparsity_min=min(sparsities), sparsity_max=max(sparsities),
                zeros_min=min(r["zeros"] for r in report["layers"]),
                error_before=sum(r.get("error_before", 0.0) for r in report["layers"]),
                error_after=sum(r.get("error_after", 0.0) for r in report["layers"]),
                perplexity=report["eval"]["perplexity"], eval_again=again["perplexity"]))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["tiny", "smol"], choices=["tiny", "smol"],
                        help="tiny: every method on CPU and CUDA; smol: SmolLM2-shaped runs")
    parser.add_argument("--config",
                        help="directory with SmolLM2's config.json and tokenizer files (smol)")
    parser.add_argument("--calib", nargs="+", required=True)
    parser.add_argument("--eval", nargs="+", required=True)
    parser.add_argument("--budget", type=float, default=60.0, help="iCBS seconds per run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs on a GPU machine")
    if "smol" in args.parts and not args.config:
        parser.error("--parts smol needs --config")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tiny, smol = Path(tmp) / "tiny", Path(tmp) / "smol"
        if "tiny" in args.parts:
            tiny_model(tiny, Path(args.calib[0]).read_text(encoding="utf-8"))
            result["cpu_vs_cuda"] = cpu_versus_cuda(tiny, args.calib)
        if "smol" in args.parts:
            smol_shaped(Path(args.config), smol)
            result["cuda_runs"] = cuda_runs(smol, args.calib, args.eval, Path(tmp) / "runs",
                                            args.budget)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
