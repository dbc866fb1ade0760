"""Perplexity of a causal language model on token windows."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """The mean NLL of every next token of each window of `batch` under `logits`, one float64
    entry per window (on the CPU)."""
    logits = logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:],
                                            reduction="none")
    return nll.double().mean(1).cpu()


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


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every predicted token of every window (the windows are
    equally long, so this is exp of the mean of `window_nll`)."""
    return math.exp(float(window_nll(model, windows, batch_size, progress).mean()))
