import pytest
import torch
from torch import nn


@pytest.fixture
def tiny_model_and_data():
    """A factory: a seeded random 12-10-4 ReLU MLP and one calibration batch of 64 samples."""

    def make(seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
        for p in model.parameters():
            p.data = torch.randn(p.shape, generator=gen)
        x = torch.randn(64, 12, generator=gen)
        return model, [(x, torch.randint(0, 4, (64,), generator=gen))]

    return make
