"""Layer-by-layer pruning of any model (`icbs.prune_layer_by_layer`), Conv2d included."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import icbs
from icbs.baselines import sparsegpt_prune, wanda_mask
from icbs.layer_stats import InputCovariance
from icbs.layers import find_prunable, input_matrix
from icbs.masks import mask_matches_pattern, parse_pattern
from icbs.sequential import stages
from icbs.vision.models import ResNet, ViT


def _images(n=48, seed=0, channels=1, size=28):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=gen)
    return [(x[i:i + 16], torch.zeros(len(x[i:i + 16]), dtype=torch.long))
            for i in range(0, n, 16)]


def test_unfolded_conv_statistics_equal_a_loop_over_patches():
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    cov = InputCovariance(3 * 3 * 2, dtype=torch.float64)
    cov.add_batch(input_matrix(conv, x))
    padded = F.pad(x, (0, 0, 1, 1))
    out_h, out_w = conv(x.float()).shape[2:]
    patches = []
    for n in range(2):
        for i in range(out_h):
            for j in range(out_w):
                rows = [i * 2 + a * 1 for a in range(3)]
                cols = [j * 1 + b * 2 for b in range(2)]
                patches.append(padded[n][:, rows][:, :, cols].reshape(-1))
    patches = torch.stack(patches)
    torch.testing.assert_close(cov.hessian, patches.T @ patches / len(patches))
    assert cov.tokens == len(patches)


def test_grouped_statistics_equal_one_covariance_per_group():
    x = torch.randn(5, 7, 3 * 4, dtype=torch.float64)
    grouped = InputCovariance(4, dtype=torch.float64, groups=3)
    grouped.add_batch(x)
    grouped.add_batch(x[:2])
    for g, part in enumerate(grouped.split()):
        alone = InputCovariance(4, dtype=torch.float64)
        alone.add_batch(x[..., 4 * g:4 * g + 4])
        alone.add_batch(x[:2, ..., 4 * g:4 * g + 4])
        torch.testing.assert_close(part.hessian, alone.hessian)
        assert part.tokens == alone.tokens == 49


class UnfoldedConv(nn.Module):
    """A Conv2d computed as unfold + nn.Linear: the same function, a Linear layer."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.linear = nn.Linear(conv.weight[0].numel(), conv.out_channels)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            self.linear.bias.copy_(conv.bias)

    def forward(self, x):
        c = self.conv
        h = (x.shape[2] + 2 * c.padding[0] - c.kernel_size[0]) // c.stride[0] + 1
        cols = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride).transpose(1, 2)
        return self.linear(cols).transpose(1, 2).reshape(x.shape[0], -1, h, cols.shape[1] // h)


def _conv_net(unfolded: bool):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    if unfolded:
        net[0] = UnfoldedConv(conv)
    return net


@pytest.mark.parametrize("method,pattern", [("wanda", "per_output"), ("sparsegpt", "2:4"),
                                            ("sparsegpt", "unstructured")])
def test_a_conv2d_is_pruned_as_its_unfolded_linear(method, pattern):
    batches = _images(channels=4)
    conv_net, linear_net = _conv_net(False), _conv_net(True)
    common = dict(sparsity=0.5, method=method, pattern=pattern, sparsegpt_columns=4)
    a = icbs.prune_layer_by_layer(conv_net, batches, **common)
    b = icbs.prune_layer_by_layer(linear_net, batches, exclude=("0.conv",), **common)
    torch.testing.assert_close(conv_net[0].weight.reshape(8, -1), linear_net[0].linear.weight)
    assert a["layers"][0]["error_after"] == pytest.approx(b["layers"][0]["error_after"],
                                                          rel=1e-4)


def test_each_stage_sees_the_inputs_of_the_model_pruned_so_far():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    dense = [layer.weight.detach().clone() for layer in (net[0], net[2])]
    x = torch.randn(64, 12)
    icbs.prune_layer_by_layer(net, [(x, x)], sparsity=0.5, method="sparsegpt",
                              pattern="per_output", sparsegpt_columns=4)
    # by hand: SparseGPT on layer 0 from the inputs, on layer 2 from the pruned layer 0's output
    h0 = x.T @ x / len(x)
    w0, _ = sparsegpt_prune(dense[0], h0, 0.5, "per_output", 4, 0.01)
    hidden = torch.tanh(x @ w0.T + net[0].bias)
    w2, _ = sparsegpt_prune(dense[1], hidden.T @ hidden / len(x), 0.5, "per_output", 4, 0.01)
    torch.testing.assert_close(net[0].weight, w0)
    torch.testing.assert_close(net[2].weight, w2, rtol=1e-4, atol=1e-6)


def test_stages_follow_the_blocks_of_a_vit_and_a_resnet():
    vit = ViT(dim=16, depth=2, heads=2)
    names = [[layer.name for layer in stage] for stage in
             stages(vit, find_prunable(vit), _images(2)[0])]
    assert names == [["patch_embed.proj"],
                     [f"blocks.0.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
                     [f"blocks.1.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
                     ["head"]]
    resnet = ResNet(widths=(4, 8))
    names = [[layer.name for layer in stage] for stage in
             stages(resnet, find_prunable(resnet), _images(2)[0])]
    assert names == [["conv1"], ["blocks.0.conv1", "blocks.0.conv2"],
                     ["blocks.1.conv1", "blocks.1.conv2", "blocks.1.shortcut.0"], ["fc"]]


@pytest.mark.parametrize("arch,method,pattern,sparsity", [
    (ViT, "wanda", "2:4", 0.5), (ViT, "alps", "unstructured", 0.7),
    (ResNet, "sparsegpt", "unstructured", 0.6), (ResNet, "icbs", "per_output", 0.5)])
def test_vision_models_are_pruned_exactly_and_lower_layer_errors(arch, method, pattern,
                                                                 sparsity):
    torch.manual_seed(0)
    model = arch()
    report = icbs.prune_layer_by_layer(model, _images(32), sparsity=sparsity, method=method,
                                       pattern=pattern, init="sparsegpt", objective="refit",
                                       budget=1.0, block_size=16)
    modules = dict(model.named_modules())
    assert len(report["layers"]) == len(find_prunable(arch()))
    for record in report["layers"]:
        mask = report["masks"][record["name"]]
        weight = modules[record["name"]].weight.reshape(mask.shape)
        assert mask_matches_pattern(mask, parse_pattern(pattern), sparsity)
        assert torch.all(weight[~mask] == 0)
        assert record["error_after"] <= record["error_before"] * (1 + 1e-6)
    if method == "icbs":
        assert sum(r["accepted"] for r in report["layers"]) > 0


def test_wanda_on_the_first_layer_uses_the_calibration_inputs():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))
    w = net[0].weight.detach().clone()
    x = torch.randn(40, 10) * torch.linspace(0.1, 3, 10)
    report = icbs.prune_layer_by_layer(net, [(x, x)], sparsity=0.5, method="wanda",
                                       pattern="per_output", include=("0",))
    expected = wanda_mask(w, (x.pow(2).mean(0)).sqrt(), 0.5, "per_output")
    assert torch.equal(report["masks"]["0"], expected)


def test_a_failure_hands_the_model_back_unchanged(monkeypatch):
    torch.manual_seed(3)
    model = ResNet(widths=(4, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(self, name, module, cov):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("solver crashed")
        module.weight.data.zero_()
        return {}

    monkeypatch.setattr(icbs.api.LayerPruner, "__call__", failing)
    with pytest.raises(RuntimeError, match="solver crashed"):
        icbs.prune_layer_by_layer(model, _images(16), sparsity=0.5, method="wanda")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="obs"), "method"), (dict(pattern="3:2"), "pattern"),
    (dict(include=("nothing*",)), "no prunable layers"), (dict(budget_share="rows"),
                                                          "budget_share"),
    (dict(budget_share="error+blocks"), "decoder blocks")])
def test_bad_settings_are_refused_before_any_weight_changes(kwargs, message):
    model = ViT(dim=16, depth=1, heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        icbs.prune_layer_by_layer(model, _images(8), **{"sparsity": 0.5, **kwargs})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_depthwise_convolution_is_pruned_group_by_group_on_its_own_inputs():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 8 * 8, 4))
    w = net[0].weight.detach().reshape(6, 9).clone()
    x = torch.randn(20, 3, 8, 8)
    report = icbs.prune_layer_by_layer(net, [(x, x)], sparsity=0.5, method="sparsegpt",
                                       pattern="unstructured", include=("0",),
                                       sparsegpt_columns=3)
    for g in range(3):
        patches = F.unfold(x[:, g:g + 1], 3, padding=1).transpose(1, 2).reshape(-1, 9)
        expected, _ = sparsegpt_prune(w[2 * g:2 * g + 2], patches.T @ patches / len(patches),
                                      0.5, "unstructured", 3, 0.01)
        torch.testing.assert_close(net[0].weight.reshape(6, 9)[2 * g:2 * g + 2], expected,
                                   rtol=1e-4, atol=1e-6)
    assert report["layers"][0]["groups"] == 3
    with pytest.raises(ValueError, match="grouped convolutions"):
        icbs.Pruner(net, [(x, torch.zeros(20, dtype=torch.long))], icbs.Settings(sparsity=0.5))


def test_batchnorm_recalibration_uses_the_statistics_of_the_pruned_inputs():
    from icbs.batchnorm import recalibrate_batchnorm

    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5),
                        nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).eval()
    x = torch.randn(10, 2, 8, 8)
    with torch.no_grad():
        net[0].weight[:, :, 0] = 0  # "pruned"
        pre = net[0](x)
    assert recalibrate_batchnorm(net, [(x, None)]) == 1
    torch.testing.assert_close(net[1].running_mean, pre.mean((0, 2, 3)))
    torch.testing.assert_close(net[1].running_var, pre.transpose(0, 1).reshape(3, -1).var(1))
    assert not net.training and not net[1].training and net[1].momentum == 0.1
    out = net(x)  # eval mode: deterministic, dropout off
    torch.testing.assert_close(out, net(x))


def test_a_layer_the_forward_pass_never_calls_is_refused_before_any_change():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 6)
    with pytest.raises(ValueError, match=r"never used in the model's forward pass: \['unused'\]"):
        icbs.prune_layer_by_layer(model, [(x, x)], sparsity=0.5, method="wanda")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_in_call_order_each_group_sees_the_groups_pruned_before_it(arch, monkeypatch):
    """Every layer's statistics against a plain forward of the final model with the layer's
    group and every later one dense again; at once, a later group's differ from them."""
    import copy

    from icbs.calibration import call_groups
    from icbs.layer_pruning import LayerPruner

    torch.manual_seed(0)
    make = (lambda: ViT(dim=16, depth=2, heads=2)) if arch == "vit" else (
        lambda: ResNet(widths=(4, 8)))
    dense = make().eval()
    batches = _images(32)
    groups = [[layer.name for layer in group]
              for stage in stages(dense, find_prunable(dense), batches[0])
              for group in call_groups(dense, stage, batches[0])]
    expected = {"vit": ["blocks.1.attn.qkv"], "resnet": ["blocks.1.conv1", "blocks.1.shortcut.0"]}
    assert expected[arch] in groups
    assert all(len(g) == 1 for g in groups if g != expected[arch])

    seen = {False: {}, True: {}}
    models = {}
    for in_order in (False, True):
        class Recording(LayerPruner):
            def prune_block(self, layers, stats, seen=seen[in_order]):
                seen.update(stats)
                return super().prune_block(layers, stats)

        monkeypatch.setattr(icbs.api, "LayerPruner", Recording)
        models[in_order] = copy.deepcopy(dense)
        report = icbs.prune_layer_by_layer(models[in_order], batches, sparsity=0.5,
                                           method="sparsegpt", true_sequential=in_order)
        if in_order:
            assert [r["name"] for r in report["layers"]] == [n for g in groups for n in g]
    model, names = models[True], [n for g in groups for n in g]
    dense_modules = dict(dense.named_modules())
    differs = []
    for g, group in enumerate(groups):
        reference = copy.deepcopy(model)
        modules = dict(reference.named_modules())
        for later in (n for later_group in groups[g:] for n in later_group):
            modules[later].weight.data.copy_(dense_modules[later].weight)
        for name in group:
            x = []
            hook = modules[name].register_forward_hook(
                lambda m, args, out, x=x: x.append(input_matrix(m, args[0]).reshape(
                    -1, m.weight[0].numel())))
            with torch.no_grad():
                for images, _ in batches:
                    reference(images)
            hook.remove()
            x = torch.cat(x).double()
            h = x.T @ x / len(x)
            torch.testing.assert_close(seen[True][name].hessian.double(), h, rtol=1e-4,
                                       atol=1e-5 * float(h.abs().max()))
            differs.append(float((seen[False][name].hessian.double() - h).abs().max())
                           > 1e-3 * float(h.abs().max()))
    assert not differs[0]  # the first layer sees the calibration inputs either way
    assert sum(differs) >= len(names) // 2  # at once, a stage's later groups see dense ones
