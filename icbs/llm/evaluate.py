"""Perplexity of a causal language model on token windows."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """The mean NLL of every next token of each window of `batch` under `logits`, one float64
    entry per window (on the CPU)."""
    logits = logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            batch[:, 1:].reshape(-1), reduction="none")
    return nll.view(len(batch), -1).double().mean(1).cpu()


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = False) -> torch.Tensor:
    """The mean next-token NLL of each window (float64, one entry per window): the paired
    data for comparing two models on the same text."""
    device = next(model.parameters()).device
    parts = []
    for start in tqdm(range(0, len(windows), batch_size), desc="eval", disable=not progress):
        batch = windows[start:start + batch_size].to(device)
        parts.append(next_token_nll(model(input_ids=batch, use_cache=False).logits, batch))
    return torch.cat(parts)


def nll_perplexity(nll: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every token of equally long windows, from their
    `window_nll`."""
    return math.exp(float(nll.mean()))


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every predicted token of every window."""
    return nll_perplexity(window_nll(model, windows, batch_size, progress))


def paired_ratio(nll_a, nll_b, resamples: int = 10000, seed: int = 0) -> dict:
    """Model B's perplexity over model A's on the same windows (`window_nll` of each), with a
    95% interval from a paired bootstrap over the windows (tokens within a window are not
    independent, windows nearly are) and how many windows B predicts better."""
    a = torch.as_tensor(nll_a, dtype=torch.float64)
    b = torch.as_tensor(nll_b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need the NLLs of the same windows (two or more) for both models, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    diff = b - a
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diff), (resamples, len(diff)), generator=gen)
    low, high = torch.quantile(diff[picks].mean(1), torch.tensor([0.025, 0.975],
                                                                 dtype=torch.float64))
    return {"ratio": math.exp(float(diff.mean())), "low": math.exp(float(low)),
            "high": math.exp(float(high)), "windows": len(diff),
            "b_better": int((diff < 0).sum())}
