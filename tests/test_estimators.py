import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icbs.calibration import load_batches
from icbs.estimators import ExactEstimator, FisherEstimator
from icbs.layers import find_prunable


class SeqModel(nn.Module):
    """A conv layer, then a linear layer applied at every position, then a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.mix = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 9, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))              # (S, 3, 3, 3)
        h = h.flatten(2).transpose(1, 2)          # (S, 9 positions, 3)
        h = torch.tanh(self.mix(h))               # (S, 9, 4)
        return self.head(h.flatten(1))


def setup(dtype=torch.float64):
    torch.manual_seed(0)
    model = SeqModel().to(dtype)
    x = torch.randn(10, 2, 6, 6, dtype=dtype)
    y = torch.randint(0, 3, (10,))
    batches = load_batches([(x[:6], y[:6]), (x[6:], y[6:])], torch.device("cpu"))
    return model, batches, x, y


@pytest.mark.parametrize("name", ["conv", "mix", "head"])
def test_fisher_matches_per_sample_autograd(name):
    model, batches, x, y = setup()
    layers = find_prunable(model)
    layer = next(layer for layer in layers if layer.name == name)
    est = FisherEstimator(model, layers, batches, F.cross_entropy)
    idx = torch.randperm(layer.numel, generator=torch.Generator().manual_seed(3))[:7]
    g, H = est.block(layer, idx)
    # independent truth: one backward per sample
    rows = []
    for s in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[s:s + 1]), y[s:s + 1]).backward()
        rows.append(layer.module.weight.grad.reshape(layer.shape).flatten()[idx].clone())
    G = torch.stack(rows)
    torch.testing.assert_close(g, G.mean(0))
    torch.testing.assert_close(H, G.T @ G / len(x))


def test_exact_estimator_matches_finite_differences():
    model, batches, x, y = setup()
    layers = find_prunable(model)
    layer = layers[1]
    est = ExactEstimator(model, batches, F.cross_entropy)
    idx = torch.tensor([0, 5, 7, 11])
    g, H = est.block(layer, idx)

    def loss_at(values):
        w = layer.w0.clone().flatten()
        w[idx] = values
        with torch.no_grad():
            layer.module.weight.copy_(w.reshape(layer.module.weight.shape))
            out = float(F.cross_entropy(model(x), y))
            layer.module.weight.copy_(layer.w0.reshape(layer.module.weight.shape))
        return out

    w = layer.w0.flatten()[idx].clone()
    h = 1e-4
    eye = torch.eye(len(idx), dtype=w.dtype)
    fd_g = torch.tensor([(loss_at(w + h * e) - loss_at(w - h * e)) / (2 * h) for e in eye],
                        dtype=torch.float64)
    fd_H = torch.tensor([[(loss_at(w + h * ei + h * ej) - loss_at(w + h * ei - h * ej)
                           - loss_at(w - h * ei + h * ej) + loss_at(w - h * ei - h * ej))
                          / (4 * h * h) for ej in eye] for ei in eye], dtype=torch.float64)
    torch.testing.assert_close(g, fd_g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(H, fd_H, atol=1e-4, rtol=1e-3)


def test_a_registered_estimator_is_an_objective_and_drives_the_loop():
    from icbs import Budget, Pruner, Settings
    from icbs.estimators import LayerwiseEstimator, available_estimators, register_estimator

    built = []

    @register_estimator("test-scaled-layerwise")
    class ScaledLayerwise(LayerwiseEstimator):  # what a plugin module would hold
        @classmethod
        def from_context(cls, context):
            built.append(context)
            return super().from_context(context)

    try:
        assert "test-scaled-layerwise" in available_estimators()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        x = torch.randn(40, 8)
        pruner = Pruner(model, [(x, torch.randint(0, 3, (40,)))],
                        Settings(sparsity=0.5, objective="test-scaled-layerwise", block_size=8,
                                 verify="estimate"))
        assert isinstance(pruner.estimator, ScaledLayerwise) and len(built) == 1
        pruner.run(Budget(steps=6))
        assert pruner.objective <= pruner.objective_start
    finally:
        from icbs.estimators import base

        base._REGISTRY.pop("test-scaled-layerwise")
    with pytest.raises(ValueError, match="objective must be one of"):
        Settings(sparsity=0.5, objective="test-scaled-layerwise")
