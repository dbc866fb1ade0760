"""The bundled task: an MLP on scikit-learn's handwritten digits (8x8 images, 10 classes).

The data ships with scikit-learn, so the demo needs no download. The trained model is cached
(keyed by its recipe) so later runs start in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DigitsRecipe:
    """How the dense model is made: architecture, split and training, all seeded."""

    hidden: tuple[int, ...] = (256, 128)
    test_fraction: float = 0.25
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self)).encode()).hexdigest()[:12]


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(recipe: DigitsRecipe = DigitsRecipe()) -> DigitsData:
    """Stratified train/test split of the 1,797 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=recipe.test_fraction,
                                              random_state=recipe.seed, stratify=y)
    return DigitsData(*(torch.from_numpy(a) for a in (x_tr, y_tr, x_te, y_te)))


def build_model(recipe: DigitsRecipe = DigitsRecipe()) -> nn.Sequential:
    sizes = (64, *recipe.hidden, 10)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def default_cache_dir() -> Path:
    return Path(os.environ.get("ICBS_CACHE", Path.home() / ".cache" / "icbs"))


def trained_model(recipe: DigitsRecipe = DigitsRecipe(), data: DigitsData | None = None,
                  cache_dir: Path | None = None) -> nn.Sequential:
    """The dense model: loaded from the cache, or trained (a few seconds) and cached."""
    data = data or load_data(recipe)
    path = (cache_dir or default_cache_dir()) / f"digits_mlp_{recipe.key()}.pt"
    model = build_model(recipe)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    n = len(data.x_train)
    for _ in range(recipe.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, recipe.batch_size):
            batch = order[start:start + recipe.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on (x, y)."""
    with torch.no_grad():
        out = model(x)
    return float((out.argmax(1) == y).float().mean()), float(F.cross_entropy(out, y))
