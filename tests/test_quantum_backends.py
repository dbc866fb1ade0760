"""Any dimod sampler in the iCBS loop (block size capped at its declared maximum, penalty and
repairs reported per step), and a smoke run of experiments/quantum_backends.py --quick."""

import csv
import importlib.util
import json
import math
import sys
from itertools import combinations
from pathlib import Path

import dimod
import numpy as np
import pytest
import torch

import icbs
from icbs import Budget, Pruner, Settings
from icbs.cli import main
from icbs.export import RecordingSolver
from solvers import CardinalityQUBO, get_solver
from solvers.penalty import declared_max_variables

ROOT = Path(__file__).resolve().parents[1]


class CappedSampler(dimod.Sampler):
    """Declares at most 12 variables; answers all-zeros and all-ones (both infeasible for
    0 < k < n), so the repair bookkeeping has a known answer: k + (n - k) = n flips."""

    parameters = {"num_reads": []}
    properties = {"max_variables": 12}

    def __init__(self):
        self.seen = []

    def sample(self, bqm, num_reads=2):
        n = len(bqm.variables)
        self.seen.append((n, bqm.offset))
        samples = np.array([[0] * n, [1] * n], dtype=np.int8)
        return dimod.SampleSet.from_samples_bqm((samples, list(bqm.variables)), bqm)


def test_declared_maximum():
    assert declared_max_variables(CappedSampler()) == 12
    assert declared_max_variables(dimod.ExactSolver()) is None
    structured = dimod.StructureComposite(dimod.ExactSolver(), list(range(7)),
                                          list(combinations(range(7), 2)))
    assert declared_max_variables(structured) == 7

    class Clique(dimod.ExactSolver):
        largest_clique_size = 5

    assert declared_max_variables(Clique()) == 5
    assert get_solver("dimod", sampler=CappedSampler()).max_variables == 12
    assert get_solver("dimod", sampler=CappedSampler(), max_variables=4).max_variables == 4


def test_prune_with_a_dimod_sampler_caps_blocks_and_reports_penalty_and_repairs(
        tiny_model_and_data):
    model, data = tiny_model_and_data()
    sampler = CappedSampler()
    report = icbs.prune(model, data, sparsity=0.6, solver=sampler, block_size=64,
                        objective="layerwise", budget=Budget(steps=6),
                        solver_params={"penalty": 2.5})
    assert report.settings["block_size"] == 12 and report.settings["solver"] == "dimod"
    assert len(sampler.seen) == 6 and max(n for n, _ in sampler.seen) <= 12
    for record, (n, offset) in zip(report.trace, sampler.seen, strict=True):
        assert record.block_size == n
        info = record.solver_info
        assert info["penalty"] == 2.5
        assert info["num_samples"] == info["num_infeasible"] == info["num_repaired"] == 2
        assert info["repair_flips"] == n
        # the BQM's constant is P * k^2 (the problem has no constant): P really was 2.5
        k = math.isqrt(round(offset / 2.5))
        assert 0 < k < n and offset == pytest.approx(2.5 * k * k)
    json.dumps(report.to_dict())  # the per-step info is JSON-ready


def test_structured_exact_sampler_gives_exact_block_answers(tiny_model_and_data):
    """A structured sampler declares its node count; ExactSolver answers + repair of every
    state is the exact optimum, checked against exhaustive search."""
    structured = dimod.StructureComposite(dimod.ExactSolver(), list(range(10)),
                                          list(combinations(range(10), 2)))
    model, data = tiny_model_and_data(1)
    pruner = Pruner(model, data, Settings(sparsity=0.5, objective="layerwise", block_size=32),
                    solver=structured)
    assert pruner.block_size == 10
    recorder = RecordingSolver(pruner.solver)
    pruner.solver = recorder
    pruner.run(Budget(steps=4), progress=False)
    assert len(recorder.calls) == 4
    for call in recorder.calls:
        assert call.problem.n <= 10
        assert call.result.energy == pytest.approx(
            get_solver("exhaustive").solve(call.problem).energy, abs=1e-12)


def test_demo_cli_runs_with_a_dimod_sampler_class(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--budget", "1", "--block-size", "40", "--out", str(out),
          "--solver", "dimod:neal:SimulatedAnnealingSampler"])
    report = json.loads((out / "report.json").read_text())["icbs_report"]
    assert report["settings"]["solver"] == "dimod" and report["settings"]["block_size"] == 40
    steps = [r for r in report["trace"] if r["block_size"] >= 2]
    assert steps and all(r["solver_info"]["penalty"] > 0 for r in steps)
    assert all("num_infeasible" in r["solver_info"] for r in steps)
    with pytest.raises(SystemExit):
        main(["demo", "--budget", "1", "--out", str(out), "--solver", "dimod:nope:Nothing"])


def _load_experiment():
    if "quantum_backends" in sys.modules:
        return sys.modules["quantum_backends"]
    path = ROOT / "experiments" / "quantum_backends.py"
    spec = importlib.util.spec_from_file_location("quantum_backends", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quantum_backends"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tts_formula():
    tts = _load_experiment().tts
    assert tts([1.0, 3.0], [True, True]) == 2.0
    assert tts([1.0, 1.0], [False, False]) == math.inf
    # p = 1/2: 1 s runs need log(0.01) / log(0.5) = 6.64 runs for 99%
    assert tts([1.0, 1.0], [True, False]) == pytest.approx(math.log(0.01) / math.log(0.5))


def test_quick_experiment(tmp_path):
    out = tmp_path / "q"
    text = _load_experiment().main(["--quick", "--out", str(out)])
    assert "Energy gap" in text and "End to end" in text
    for name in ("instances", "gap", "ttt", "e2e"):
        assert (out / f"quantum_{name}.csv").stat().st_size > 0
    for name in ("gap", "infeasible", "ttt", "e2e"):
        assert (out / f"quantum_{name}.png").stat().st_size > 5000
    with open(out / "quantum_instances.csv") as fh:
        instances = list(csv.DictReader(fh))
    with open(out / "quantum_gap.csv") as fh:
        gaps = list(csv.DictReader(fh))
    assert sorted(int(i["n"]) for i in instances) == [16, 32]
    assert all(float(g["gap"]) >= 0 for g in gaps)
    small = next(i for i in instances if i["n"] == "16")
    # independent truth by enumerating all 2^16 states of the saved problem
    p = CardinalityQUBO.load(out / small["npz"])
    n, k = p.n, int(p.k[0])
    X = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(float)
    e = np.einsum("si,ij,sj->s", X, p.Q, X)
    pop = X.sum(1).astype(int)
    best = e[pop == k].min()
    assert float(small["e_ref"]) == pytest.approx(best, abs=1e-12)
    p_star = max(0.0, max((best - e[pop == c].min()) / (c - k) ** 2
                          for c in range(n + 1) if c != k))
    assert float(small["p_star"]) == pytest.approx(p_star, rel=1e-9, abs=1e-12)
    # dimod's ExactSolver: ground state feasible at P* (just above), not below it
    exact = {g["penalty_label"]: g for g in gaps
             if g["instance"] == small["instance"] and g["solver"] == "dimod.ExactSolver"}
    assert exact["1P*"]["ground_feasible"] == "1"
    if p_star > 1e-9:
        assert exact["0.5P*"]["ground_feasible"] == "0"
    cqm = next(g for g in gaps if g["instance"] == small["instance"]
               and g["solver"] == "dimod.ExactCQMSolver")
    assert float(cqm["energy"]) == pytest.approx(best, abs=1e-9)
    with open(out / "quantum_e2e.csv") as fh:
        e2e = list(csv.DictReader(fh))
    assert {r["block_size"] for r in e2e} == {"120", "256"}
    assert all(0 <= float(r["accuracy"]) <= 1 for r in e2e)
    assert (out / "qubos" / "index.csv").exists()


def test_improve_layer_caps_blocks_at_the_samplers_maximum():
    from icbs.layerwise import improve_layer
    from icbs.masks import mask_from_scores

    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(6, 40, generator=gen)
    x = torch.randn(200, 40, generator=gen)
    hessian = x.T @ x / len(x)
    mask = mask_from_scores(w0.abs(), 0.5, "per_output")
    sampler = CappedSampler()
    result = improve_layer(w0, hessian, mask, pattern="per_output", sparsity=0.5, steps=5,
                           block_size=40, solver=sampler)
    assert result.steps == 5 and len(sampler.seen) == 5
    assert all(n == 12 for n, _ in sampler.seen)  # 20 pruned + 20 kept per row, capped to 12
    assert result.error_after <= result.error_before + 1e-9
