"""Dense targets: each layer fit to the dense model's outputs on the pruned model's inputs."""

import copy

import pytest
import torch

from icbs.layer_pruning import LayerPruner
from icbs.layer_stats import InputCovariance, dense_output_error, dense_target

pytest.importorskip("transformers")
from test_llm import TEXT, _tiny_llama_dir  # noqa: E402

from icbs.llm.data import calibration_windows, read_text, tokenize  # noqa: E402
from icbs.llm.load import load_model  # noqa: E402
from icbs.llm.prune import LLMPruneSettings, prune_model  # noqa: E402
from icbs.llm.sequential import decoder_blocks, prune_sequential  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"), bos=False)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


def _paired(x, x0, batches=2):
    cov = InputCovariance(x.shape[1], dtype=x.dtype, paired=True)
    for part, part0 in zip(x.chunk(batches), x0.chunk(batches), strict=True):
        cov.add_batch(part, part0)
    return cov


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_dense_target_is_the_least_squares_fit_to_the_dense_outputs(damp):
    torch.manual_seed(0)
    tokens, cols, rows = 200, 12, 5
    x0 = torch.randn(tokens, cols, dtype=torch.float64)
    x = x0 + 0.3 * torch.randn(tokens, cols, dtype=torch.float64)  # upstream error
    w0 = torch.randn(rows, cols, dtype=torch.float64)
    cov = _paired(x, x0)
    target = dense_target(w0, cov, damp)

    # min |T X - W0 X0|^2 / tokens + lambda |T - W0|^2 as one stacked least-squares problem
    lam = damp * float(torch.diagonal(x.T @ x / tokens).mean())
    a = torch.cat([x / tokens ** 0.5, lam ** 0.5 * torch.eye(cols, dtype=x.dtype)])
    b = torch.cat([x0 @ w0.T / tokens ** 0.5, lam ** 0.5 * w0.T])
    torch.testing.assert_close(target, torch.linalg.lstsq(a, b).solution.T)

    w = torch.randn(rows, cols, dtype=torch.float64)
    assert dense_output_error(w0, w, cov) == pytest.approx(
        float(((w @ x.T - w0 @ x0.T) ** 2).sum()) / tokens, rel=1e-10)
    # any row's dense-output error is (w - t)^T H (w - t) + 2 lambda w.(w0 - t) plus one
    # constant: the ridge leaves a linear term the methods (fitting t under H) do not see
    h = cov.hessian
    gaps = []
    for _ in range(3):
        w = torch.randn(rows, cols, dtype=torch.float64)
        true = ((w @ x.T - w0 @ x0.T) ** 2).sum(1) / tokens
        fitted = (((w - target) @ h) * (w - target)).sum(1)
        gaps.append(true - fitted - 2 * lam * (w * (w0 - target)).sum(1))
    torch.testing.assert_close(gaps[0], gaps[1])
    torch.testing.assert_close(gaps[0], gaps[2])


def test_dense_target_is_the_weights_when_the_inputs_are_the_dense_ones():
    torch.manual_seed(1)
    x = torch.randn(64, 8)
    w0 = torch.randn(3, 8)
    torch.testing.assert_close(dense_target(w0, _paired(x, x), 0.01), w0, rtol=1e-5, atol=1e-5)


def test_a_singular_hessian_without_damping_is_refused_and_pairs_are_checked():
    x = torch.randn(32, 6)
    x[:, 2] = 0  # a dead input
    with pytest.raises(ValueError, match="raise --target-damp above 0"):
        dense_target(torch.randn(2, 6), _paired(x, x), 0.0)
    assert torch.isfinite(dense_target(torch.randn(2, 6), _paired(x, x), 0.01)).all()
    cov = InputCovariance(6, paired=True)
    with pytest.raises(ValueError, match="need the dense inputs"):
        cov.add_batch(x)
    with pytest.raises(ValueError, match="do not pair"):
        cov.add_batch(x, x[:5])
    with pytest.raises(ValueError, match="unpaired ones none"):
        InputCovariance(6).add_batch(x, x)


def _layer_matrices(model, names, inputs):
    """Each named layer's inputs (Conv2d's unfolded) as one (tokens, cols) float64 matrix
    over plain forwards of `model` on each of `inputs`."""
    from icbs.layers import input_matrix

    seen = {n: [] for n in names}

    def hook(name):
        def record(module, args, out):
            x = input_matrix(module, args[0])
            seen[name].append(x.reshape(-1, x.shape[-1]))
        return record

    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for batch in inputs:
            model(batch)
    for handle in hooks:
        handle.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


# the tiny LLaMA block's layers in call order, grouped by shared input
CALL_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _prune_by_magnitude(seen, calls):
    """A block callback that records the statistics and the groups it is called with, then
    halves every row by magnitude."""
    def prune_half(layers, stats):
        calls.append(list(layers))
        for name, module in layers.items():
            seen[name] = stats[name]
            w = module.weight
            w.mul_(w.abs() >= w.abs().median(dim=1, keepdim=True).values)
        return [{} for _ in layers]
    return prune_half


def _partly_pruned(dense, pruned, block, before):
    """A copy of `dense` with the blocks before `block` and the layers `before` of `block`
    taken from `pruned`."""
    reference = copy.deepcopy(dense)
    ref_blocks, pruned_blocks = decoder_blocks(reference)[1], decoder_blocks(pruned)[1]
    for index in range(block):
        ref_blocks[index].load_state_dict(pruned_blocks[index].state_dict())
    modules, pruned_modules = dict(ref_blocks[block].named_modules()), dict(
        pruned_blocks[block].named_modules())
    for name in before:
        modules[name].weight.data.copy_(pruned_modules[name].weight)
    return reference


@pytest.mark.parametrize("dense_targets", [False, True])
def test_true_sequential_takes_each_group_on_the_groups_pruned_before_it(
        model_dir, text_file, dense_targets):
    """Block 1's statistics of each call group against plain forwards of a model whose block
    0 and earlier groups of block 1 are pruned (and, for dense targets, of the dense model);
    dense targets always go group by group."""
    model, tokenizer = load_model(model_dir, "cpu")
    dense = copy.deepcopy(model)
    windows = calibration_windows(tokenize(tokenizer, read_text([text_file])), 6, 40)
    seen, calls = {}, []
    prune_sequential(model, windows, _prune_by_magnitude(seen, calls), batch_size=6,
                     progress=False, dense_targets=dense_targets,
                     true_sequential=not dense_targets)
    prefix = decoder_blocks(model)[0]
    assert calls[4:8] == [[f"{prefix}.1.{n}" for n in group] for group in CALL_GROUPS]
    for g, group in enumerate(CALL_GROUPS):
        before = [name for earlier in CALL_GROUPS[:g] for name in earlier]
        reference = _partly_pruned(dense, model, 1, before)
        names = [f"{prefix}.1.{n}" for n in group]
        x = _layer_matrices(reference, names, [windows])
        x0 = _layer_matrices(dense, names, [windows])
        for name in names:
            scale = float((x[name].T @ x[name]).abs().max()) / len(x[name])
            torch.testing.assert_close(seen[name].hessian.double(),
                                       x[name].T @ x[name] / len(x[name]), rtol=1e-4,
                                       atol=1e-5 * scale)
            if dense_targets:
                torch.testing.assert_close(seen[name].cross.double(),
                                           x[name].T @ x0[name] / len(x[name]), rtol=1e-4,
                                           atol=1e-5 * scale)
                assert (seen[name].cross - seen[name].hessian).abs().max() > 0.01 * scale
    if dense_targets:  # block 0's first group has the dense inputs: X = X0
        first = [f"{prefix}.0.{n}" for n in CALL_GROUPS[0]]
        assert all(name in seen for name in first)
        for name in first:
            torch.testing.assert_close(seen[name].cross, seen[name].hessian)


def test_by_default_a_block_is_pruned_at_once_on_its_dense_self(model_dir, text_file):
    model, tokenizer = load_model(model_dir, "cpu")
    dense = copy.deepcopy(model)
    windows = calibration_windows(tokenize(tokenizer, read_text([text_file])), 6, 40)
    seen, calls = {}, []
    prune_sequential(model, windows, _prune_by_magnitude(seen, calls), batch_size=6,
                     progress=False)
    prefix = decoder_blocks(model)[0]
    assert len(calls) == 2 and len(calls[1]) == 7
    reference = _partly_pruned(dense, model, 1, [])
    names = [n for n in seen if n.startswith(f"{prefix}.1.")]
    x = _layer_matrices(reference, names, [windows])
    for name in names:
        torch.testing.assert_close(seen[name].hessian.double(),
                                   x[name].T @ x[name] / len(x[name]), rtol=1e-4, atol=1e-6)


def test_a_restored_block_still_carries_the_dense_activations(model_dir, text_file):
    settings = LLMPruneSettings(method="sparsegpt", nsamples=4, seqlen=32, reconstruct=True,
                                sparsegpt_columns=16, dense_targets=True)
    model, tokenizer = load_model(model_dir, "cpu")
    full = prune_model(model, tokenizer, settings, [text_file], progress=False)
    modules = dict(model.named_modules())
    block0 = {r["name"]: (modules[r["name"]].weight.detach().clone(), full["masks"][r["name"]],
                          r) for r in full["layers"] if ".layers.0." in r["name"]}

    resumed, tokenizer = load_model(model_dir, "cpu")
    again = prune_model(resumed, tokenizer, settings, [text_file], progress=False,
                        layer_pruner=lambda s, total: LayerPruner(s, total, restored=block0))
    assert [r["error_after"] for r in again["layers"]] == [r["error_after"] for r in
                                                            full["layers"]]
    for name, module in resumed.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            assert torch.equal(module.weight, modules[name].weight), name


def test_dense_targets_change_only_the_layers_after_the_first_group(model_dir, text_file):
    results = {}
    for dense_targets in (False, True):
        model, tokenizer = load_model(model_dir, "cpu")
        settings = LLMPruneSettings(method="alps", nsamples=4, seqlen=32, true_sequential=True,
                                    dense_targets=dense_targets)
        report = prune_model(model, tokenizer, settings, [text_file], progress=False)
        results[dense_targets] = {r["name"]: r["error_after"] for r in report["layers"]}
    first = [n for n in results[True] if ".layers.0.self_attn." in n and "o_proj" not in n]
    later = [n for n in results[True] if n not in first]
    assert len(first) == 3
    for name in first:  # X = X0 there, so T = W0 up to the ridge's rounding
        assert results[True][name] == pytest.approx(results[False][name], rel=1e-3)
    assert all(results[True][n] != pytest.approx(results[False][n], rel=1e-3) for n in later)


@pytest.mark.parametrize("architecture", ["vit", "resnet"])
def test_the_layer_by_layer_driver_pairs_inputs_with_the_dense_models(architecture,
                                                                      monkeypatch):
    import icbs
    from icbs.layers import find_prunable
    from icbs.sequential import stages
    from icbs.vision.models import ResNet, ViT

    torch.manual_seed(0)
    model = ViT(dim=16, depth=2, heads=2) if architecture == "vit" else ResNet(widths=(4, 8))
    model.eval()
    dense = copy.deepcopy(model)
    x = torch.randn(32, 1, 28, 28)
    batches = [(x[i:i + 16], torch.zeros(16, dtype=torch.long)) for i in (0, 16)]
    seen = {}

    class Recording(LayerPruner):
        def prune_block(self, layers, stats):
            seen.update(stats)
            return super().prune_block(layers, stats)

    monkeypatch.setattr(icbs.api, "LayerPruner", Recording)
    report = icbs.prune_layer_by_layer(model, batches, sparsity=0.5, method="sparsegpt",
                                       dense_targets=True)
    names = [r["name"] for r in report["layers"]]
    stage_of = {layer.name: index for index, stage in enumerate(
        stages(dense, find_prunable(dense, grouped=True), batches[0])) for layer in stage}
    # every layer's pairs against plain forwards: of the final model with the layer's stage
    # and the ones after it dense again, and of the dense copy
    images = [b[0] for b in batches]
    x0 = _layer_matrices(dense, names, images)
    for name in names:
        reference = copy.deepcopy(model)
        modules, dense_modules = dict(reference.named_modules()), dict(dense.named_modules())
        for later in (n for n in names if stage_of[n] >= stage_of[name]):
            modules[later].weight.data.copy_(dense_modules[later].weight)
        xs = _layer_matrices(reference, [name], images)[name]
        cross = xs.T @ x0[name] / len(xs)
        torch.testing.assert_close(seen[name].cross.double(), cross, rtol=1e-4,
                                   atol=1e-5 * float(cross.abs().max()))
    assert all("error_dense" in r for r in report["layers"])
