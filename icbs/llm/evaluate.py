"""Perplexity of a causal language model on token windows."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """(summed NLL, count) of every next token of the windows `batch` under `logits`."""
    logits = logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            batch[:, 1:].reshape(-1), reduction="sum")
    return float(nll), batch[:, 1:].numel()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every predicted token of every window."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="eval", disable=not progress):
        batch = windows[start:start + batch_size].to(device)
        nll, tokens = next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)
        total, count = total + nll, count + tokens
    return math.exp(total / count)
