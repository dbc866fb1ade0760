"""Text files to token windows: seeded calibration samples and non-overlapping eval windows,
each optionally led by the tokenizer's BOS token."""

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
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                             f"give plain-text files") from None
        if "\x00" in text:
            raise ValueError(f"{path} is not plain text (it holds NUL bytes)")
        lines: list[str] = []
        for line in text.splitlines() + [""]:
            if line.strip():
                lines.append(line.strip())
            elif lines:
                paragraphs.append(" ".join(lines))
                lines = []
    return "\n\n".join(paragraphs)


BOS_CHOICES = ("auto", "yes", "no")


def resolve_bos(tokenizer, bos: str = "auto") -> int | None:
    """The token id put before every window, or None for none.

    "auto": the tokenizer's BOS when its plain encode adds one (Gemma, LLaMA-2, Mistral);
    "yes": its BOS, which must exist; "no": none, the SparseGPT/Wanda convention of encoding
    the text once as a whole and cutting windows from it.
    """
    if bos not in BOS_CHOICES:
        raise ValueError(f"bos must be one of {BOS_CHOICES}, got {bos!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos == "no":
        return None
    if bos == "yes":
        if bos_id is None:
            raise ValueError("--bos yes: the tokenizer has no BOS token; use --bos no or auto")
        return int(bos_id)
    if bos_id is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos_id) if len(ids) > 1 and ids[0] == bos_id else None


def tokenize(tokenizer, text: str, bos_id: int | None = None) -> torch.Tensor:
    """The text's token ids as a 1-D int64 tensor.

    Without `bos_id` the tokenizer's default encode (for a BOS tokenizer, one BOS at the start
    of the text); with it, no special tokens, since the windows get their own BOS.
    """
    if bos_id is None:
        ids = tokenizer(text)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_length(tokens: torch.Tensor, seqlen: int, what: str) -> None:
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if len(tokens) < seqlen:
        raise ValueError(f"the {what} text has {len(tokens)} tokens, fewer than one window of "
                         f"seqlen={seqlen}; give more text or a shorter --seqlen")


def _with_bos(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return windows
    return torch.cat([torch.full((len(windows), 1), bos_id, dtype=windows.dtype), windows], 1)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0,
                        bos_id: int | None = None) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets, shape (nsamples, seqlen),
    or (nsamples, 1 + seqlen) with `bos_id` before each."""
    _check_length(tokens, seqlen, "calibration")
    if nsamples < 1:
        raise ValueError(f"nsamples must be positive, got {nsamples}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seqlen + 1, (nsamples,), generator=gen)
    return _with_bos(torch.stack([tokens[s:s + seqlen] for s in starts.tolist()]), bos_id)


def eval_windows(tokens: torch.Tensor, seqlen: int, max_tokens: int | None = None,
                 bos_id: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `seqlen` tokens, shape (windows, seqlen), or
    (windows, 1 + seqlen) with `bos_id` before each (then every text token is scored).

    With `max_tokens`, only the first max_tokens // seqlen windows (at least one) are kept.
    """
    _check_length(tokens, seqlen, "evaluation")
    count = len(tokens) // seqlen
    if max_tokens is not None:
        count = min(count, max(1, max_tokens // seqlen))
    return _with_bos(tokens[:count * seqlen].reshape(count, seqlen), bos_id)
