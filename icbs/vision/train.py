"""Seeded training of the vision models, cached by recipe like the digits demo."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..digits import default_cache_dir
from ..report import write_atomic
from .data import ImageData
from .models import ResNet, ViT

logger = logging.getLogger(__name__)
ARCHITECTURES = {"vit": ViT, "resnet": ResNet}


@dataclass(frozen=True)
class VisionRecipe:
    """Architecture and training (AdamW, cosine schedule, random shifts and flips), seeded."""

    arch: str = "vit"
    arch_kwargs: dict = field(default_factory=dict)
    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    train_subset: int | None = None  # first n training images (the tests use a few)
    seed: int = 0

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def build(self) -> nn.Module:
        return ARCHITECTURES[self.arch](**self.arch_kwargs)


# the experiment's dense models (training is cached under these recipes' keys)
RECIPES = {"vit": VisionRecipe("vit", epochs=15), "resnet": VisionRecipe("resnet", epochs=10)}


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero padding) and horizontal flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
    dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
    out = padded[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def train(recipe: VisionRecipe, data: ImageData) -> tuple[nn.Module, float]:
    """A model trained by the recipe and its training time in seconds."""
    torch.manual_seed(recipe.seed)
    model = recipe.build()
    x, y = data.x_train, data.y_train
    if recipe.train_subset is not None:
        x, y = x[:recipe.train_subset], y[:recipe.train_subset]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * math.ceil(len(x) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    gen = torch.Generator().manual_seed(recipe.seed)
    tic = time.perf_counter()
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), recipe.batch_size):
            batch = order[start:start + recipe.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(augment(x[batch], gen)), y[batch]).backward()
            opt.step()
            schedule.step()
        logger.info("%s epoch %d/%d: %.0f s", recipe.arch, epoch + 1, recipe.epochs,
                    time.perf_counter() - tic)
    return model.eval(), time.perf_counter() - tic


def trained_model(recipe: VisionRecipe, data: ImageData,
                  cache_dir: Path | None = None) -> tuple[nn.Module, dict]:
    """The model of `recipe`: from the cache, or trained and cached. Returns it and its
    training record (seconds, recipe)."""
    path = (cache_dir or default_cache_dir()) / f"{recipe.arch}_fmnist_{recipe.key()}.pt"
    model = recipe.build()
    if path.exists():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["record"]
    model, seconds = train(recipe, data)
    record = {"train_seconds": seconds, "recipe": asdict(recipe)}
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "record": record}, buffer)
    write_atomic(path, buffer.getvalue())
    return model, record


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of `model` (in eval mode) on (x, y)."""
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
               for i in range(0, len(x), batch))
    return hits / len(x)
