import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import icbs
from icbs import Budget, Pruner, Settings
from icbs.masks import mask_matches_pattern, parse_pattern


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(),
                         nn.Linear(8, 4))


def make_data(seed=0, n=96):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    y = (x[:, :4].argmax(1))
    return [(x[:48], y[:48]), (x[48:], y[48:])]


def dense_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("pattern", ["unstructured", "per_output", "2:4"])
@pytest.mark.parametrize("objective", ["layerwise", "fisher"])
def test_masks_stay_exact_and_weights_are_dense_times_mask(pattern, objective):
    model = make_model()
    dense = dense_copy(model)
    sparsity = 0.5 if pattern == "2:4" else 0.75
    pruner = Pruner(model, make_data(), Settings(sparsity=sparsity, pattern=pattern,
                                                 objective=objective, block_size=16))
    pruner.run(Budget(steps=25), progress=False)
    assert sum(r.accepted for r in pruner.trace) > 0
    for layer in pruner.layers:
        assert mask_matches_pattern(layer.mask, parse_pattern(pattern), sparsity)
        w = layer.module.weight.detach()
        torch.testing.assert_close(w, dense[layer.name + ".weight"] * layer.mask)


def test_layerwise_trace_is_the_true_error_and_never_rises():
    model = make_model()
    pruner = Pruner(model, make_data(), Settings(sparsity=0.5, objective="layerwise",
                                                 init="wanda", block_size=24))
    start = pruner.estimator.objective(pruner.layers)
    report = pruner.run(Budget(steps=40), progress=False)
    objectives = [r.objective for r in report.trace]
    assert all(b <= a + 1e-9 for a, b in zip([start] + objectives, objectives, strict=False))
    assert objectives[-1] < start
    assert pruner.estimator.objective(pruner.layers) == pytest.approx(objectives[-1], rel=1e-5)


def test_verify_loss_never_raises_the_calibration_loss():
    model = make_model()
    data = make_data()
    pruner = Pruner(model, data, Settings(sparsity=0.8, objective="fisher", verify="loss",
                                          block_size=16))
    losses = [pruner.estimator.objective(pruner.layers)]

    def record(p, r):
        losses.append(p.estimator.objective(p.layers))

    pruner.run(Budget(steps=20), callback=record, progress=False)
    assert all(b <= a + 1e-7 for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    settings = dict(sparsity=0.7, pattern="per_output", block_size=12, objective="fisher",
                    tabu_steps=3, seed=5)
    full = make_model()
    report_full = icbs.prune(full, make_data(), budget=Budget(steps=30), progress=False,
                             **settings)

    ckpt = tmp_path / "run.ckpt"
    part = make_model()
    icbs.prune(part, make_data(), budget=Budget(steps=12), checkpoint=ckpt, progress=False,
               **settings)
    resumed = make_model()
    report_resumed = icbs.prune(resumed, make_data(), budget=Budget(steps=30), checkpoint=ckpt,
                                progress=False, **settings)
    assert [r.delta for r in report_resumed.trace] == [r.delta for r in report_full.trace]
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_ctrl_c_stops_after_the_step_and_leaves_a_valid_checkpoint(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    model = make_model()
    pruner = Pruner(model, make_data(), Settings(sparsity=0.6, block_size=12))

    def interrupt(p, record):
        if record.step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    report = pruner.run(Budget(steps=50), checkpoint=ckpt, callback=interrupt, progress=False)
    assert report.steps == 5
    again = Pruner(make_model(), make_data(), Settings(sparsity=0.6, block_size=12))
    again.load_checkpoint(ckpt)
    assert len(again.trace) == 5
    for a, b in zip(pruner.layers, again.layers, strict=True):
        assert torch.equal(a.mask, b.mask)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran_code",))


def _bad_checkpoints(tmp_path, good):
    """(name, path) of files a resume must refuse: a pickle that would run code, a foreign
    safetensors file, a truncated checkpoint, one without its state, a directory."""
    import pickle

    from safetensors.torch import save_file

    bad = {}
    bad["pickle"] = tmp_path / "pickle.ckpt"
    with open(bad["pickle"], "wb") as handle:
        pickle.dump({"settings": _RunsCode()}, handle)
    bad["foreign"] = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, bad["foreign"])
    bad["truncated"] = tmp_path / "truncated.ckpt"
    bad["truncated"].write_bytes(good.read_bytes()[:-40])
    bad["directory"] = tmp_path / "a_directory"
    bad["directory"].mkdir()
    return bad


@pytest.mark.parametrize("case", ["pickle", "foreign", "truncated", "directory"])
def test_resume_refuses_anything_but_an_icbs_checkpoint_and_leaves_the_model(
        tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.ckpt"
    Pruner(make_model(), make_data(), Settings(sparsity=0.6, block_size=12)).run(
        Budget(steps=3), checkpoint=good, progress=False)
    path = _bad_checkpoints(tmp_path, good)[case]
    pruner = Pruner(make_model(), make_data(), Settings(sparsity=0.6, block_size=12))
    before = [layer.mask.clone() for layer in pruner.layers]
    with pytest.raises(ValueError, match="not an icbs checkpoint|is not a file"):
        pruner.load_checkpoint(path)
    assert not (tmp_path / "ran_code").exists()
    assert all(torch.equal(a, layer.mask) for a, layer in zip(before, pruner.layers,
                                                                strict=True))
    assert pruner.trace == []


def test_a_checkpoint_is_safetensors_with_json_state(tmp_path):
    from safetensors import safe_open

    ckpt = tmp_path / "run.ckpt"
    pruner = Pruner(make_model(), make_data(), Settings(sparsity=0.6, block_size=12))
    pruner.run(Budget(steps=3), checkpoint=ckpt, progress=False)
    with safe_open(ckpt, "pt") as handle:
        assert {f"mask/{layer.name}" for layer in pruner.layers} <= set(handle.keys())
        state = __import__("json").loads(handle.metadata()["icbs"])
    assert state["layers"] == [layer.name for layer in pruner.layers]
    assert len(state["trace"]) == 3


def test_budget_in_passes_and_report_json(tmp_path):
    model = make_model()
    report = icbs.prune(model, make_data(), sparsity=0.5, budget=Budget(passes=1),
                        block_size=64, progress=False)
    total = 16 * 32 + 32 * 8 + 8 * 4
    assert report.steps == int(np.ceil(total / 64))
    report.save(tmp_path / "r.json")
    import json

    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["trace"]) == report.steps
    assert all(layer["sparsity"] == 0.5 for layer in saved["layers"])


@pytest.mark.parametrize("kwargs,data,message", [
    (dict(sparsity=1.0), None, "sparsity must be a fraction"),
    (dict(sparsity=0.0), None, "sparsity must be a fraction"),
    (dict(sparsity=0.5, block_size=1), None, "block_size must be an integer >= 2"),
    (dict(sparsity=0.5, solver="magic"), None, "unknown solver 'magic'"),
    (dict(sparsity=0.5), [], "calibration data is empty"),
    (dict(sparsity=0.5), [(torch.full((4, 16), float("nan")), torch.zeros(4).long())],
     "NaN or Inf inputs"),
    (dict(sparsity=0.5, include=("nothing*",)), None, "no prunable layers"),
    (dict(sparsity=0.625, pattern="3:8"), None, "not a multiple of M=8"),
    (dict(sparsity=0.5, objective="taylor"), None, "objective must be one of"),
])
def test_bad_input_raises_before_any_weight_is_touched(kwargs, data, message):
    model = make_model()
    if kwargs.get("pattern") == "3:8":
        model = nn.Sequential(nn.Linear(12, 4))
    before = dense_copy(model)
    with pytest.raises(ValueError, match=message):
        icbs.prune(model, make_data() if data is None else data, budget=Budget(steps=3),
                   progress=False, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_nan_weights_are_refused():
    model = make_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        icbs.prune(model, make_data(), sparsity=0.5, budget=Budget(steps=1), progress=False)


@pytest.mark.parametrize("init", ["magnitude", "wanda", "gradient", "random"])
def test_every_init_gives_an_exact_mask_and_improves(init):
    model = make_model()
    pruner = Pruner(model, make_data(), Settings(sparsity=0.6, init=init, block_size=16))
    loss0 = pruner.estimator.objective(pruner.layers)
    pruner.run(Budget(steps=15), progress=False)
    for layer in pruner.layers:
        assert mask_matches_pattern(layer.mask, parse_pattern("unstructured"), 0.6)
    assert pruner.estimator.objective(pruner.layers) < loss0


def test_exact_objective_runs_on_small_blocks():
    model = make_model()
    report = icbs.prune(model, make_data(), sparsity=0.5, objective="exact", block_size=8,
                        budget=Budget(steps=6), progress=False)
    assert report.accepted > 0


def test_loss_fn_and_model_mode_are_respected():
    model = make_model()
    model.train()
    report = icbs.prune(model, make_data(), sparsity=0.5, budget=Budget(steps=3),
                        loss_fn=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1),
                        progress=False)
    assert model.training
    assert report.steps == 3


def test_solver_is_warmed_up_before_the_budget_and_samplers_are_not_called():
    import dimod

    from solvers import get_solver
    from solvers.anneal import SwapAnnealer

    events = []

    class Recording(SwapAnnealer):
        def warm_up(self):
            events.append("warm_up")
            super().warm_up()

        def _solve(self, problem, x0, rng):
            events.append("solve")
            return super()._solve(problem, x0, rng)

    pruner = Pruner(make_model(), make_data(), Settings(sparsity=0.5, block_size=8),
                    solver=Recording())
    assert events == ["warm_up", "solve"]  # the warm-up's own tiny solve, before any step
    pruner.run(Budget(steps=2), progress=False)
    assert events[2:] == ["solve", "solve"]

    class Counting(dimod.ExactSolver):
        calls = 0

        def sample(self, bqm, **kwargs):
            Counting.calls += 1
            return super().sample(bqm, **kwargs)

    get_solver("dimod", sampler=Counting()).warm_up()
    assert Counting.calls == 0  # an external sampler (a QPU) is never called to warm up


def test_write_csv_round_trip(tmp_path):
    import csv

    from icbs.report import write_csv

    rows = [{"a": 1, "b": 2.5}, {"a": 3, "b": "x"}]
    write_csv(tmp_path / "sub" / "t.csv", rows)
    with open(tmp_path / "sub" / "t.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "2.5"}, {"a": "3", "b": "x"}]
