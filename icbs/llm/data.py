"""Text files to token windows: seeded calibration samples and non-overlapping eval windows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def read_text(paths: Sequence[str | Path]) -> str:
    """Plain UTF-8 text files as one string: each paragraph's lines joined by spaces,
    paragraphs (and files) separated by blank lines."""
    if not paths:
        raise ValueError("no text files given")
    paragraphs: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        lines: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines() + [""]:
            if line.strip():
                lines.append(line.strip())
            elif lines:
                paragraphs.append(" ".join(lines))
                lines = []
    return "\n\n".join(paragraphs)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids as a 1-D int64 tensor."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def _check_length(tokens: torch.Tensor, seqlen: int, what: str) -> None:
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if len(tokens) < seqlen:
        raise ValueError(f"the {what} text has {len(tokens)} tokens, fewer than one window of "
                         f"seqlen={seqlen}; give more text or a shorter --seqlen")


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int,
                        seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets, shape (nsamples, seqlen)."""
    _check_length(tokens, seqlen, "calibration")
    if nsamples < 1:
        raise ValueError(f"nsamples must be positive, got {nsamples}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `seqlen` tokens, shape (windows, seqlen).

    With `max_tokens`, only the first max_tokens // seqlen windows (at least one) are kept.
    """
    _check_length(tokens, seqlen, "evaluation")
    count = len(tokens) // seqlen
    if max_tokens is not None:
        count = min(count, max(1, max_tokens // seqlen))
    return tokens[:count * seqlen].reshape(count, seqlen)
