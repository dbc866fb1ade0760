"""The LLM pipeline on a GPU: CUDA gives what the CPU gives, and absolute times there.

1. A tiny LLaMA (float32, random weights, a character tokenizer) pruned on the CPU and on
   CUDA with the same calibration windows: magnitude and Wanda masks must be identical,
   SparseGPT's nearly so; every method keeps the pattern exactly.
2. SmolLM2-135M's shape (its config.json and tokenizer, random bfloat16 weights: the hub's
   checkpoint dtype) pruned through `icbs prune --device cuda` with every method: time per
   phase, peak GPU memory, exact sparsity, and `icbs eval` on the saved directory
   reproducing the report's perplexity (meaningless in value: the weights are random).

    python experiments/gpu_check.py --config DIR --calib a.txt --eval b.txt --out DIR
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
from icbs.llm.prune import LLMPruneSettings, prune_model
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


def cpu_versus_cuda(model_dir: Path, calib: list[str]) -> list[dict]:
    rows = []
    for method, pattern in [("magnitude", "per_output"), ("wanda", "per_output"),
                            ("wanda", "2:4"), ("sparsegpt", "per_output"),
                            ("sparsegpt", "2:4"), ("icbs", "2:4")]:
        settings = LLMPruneSettings(method=method, pattern=pattern, sparsity=0.5, nsamples=16,
                                    seqlen=128, budget=5.0)
        masks = {}
        for device in ("cpu", "cuda"):
            model, tokenizer = load_model(model_dir, device)
            report = prune_model(model, tokenizer, settings, calib, progress=False)
            masks[device] = report["masks"]
            for name, mask in report["masks"].items():
                assert mask_matches_pattern(mask, parse_pattern(pattern), 0.5), (method, name)
        agree = [float((masks["cpu"][n] == masks["cuda"][n]).float().mean()) for n in masks["cpu"]]
        rows.append(dict(method=method, pattern=pattern, mask_agreement_min=min(agree)))
        print(rows[-1], flush=True)
        if method in ("magnitude", "wanda"):
            assert min(agree) == 1.0, f"{method} masks differ between CPU and CUDA"
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
    parser.add_argument("--config", required=True,
                        help="directory with SmolLM2's config.json and tokenizer files")
    parser.add_argument("--calib", nargs="+", required=True)
    parser.add_argument("--eval", nargs="+", required=True)
    parser.add_argument("--budget", type=float, default=60.0, help="iCBS seconds per run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs on a GPU machine")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tiny, smol = Path(tmp) / "tiny", Path(tmp) / "smol"
        tiny_model(tiny, Path(args.calib[0]).read_text(encoding="utf-8"))
        result["cpu_vs_cuda"] = cpu_versus_cuda(tiny, args.calib)
        smol_shaped(Path(args.config), smol)
        result["cuda_runs"] = cuda_runs(smol, args.calib, args.eval, Path(tmp) / "runs",
                                        args.budget)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
