"""Exported block QUBOs: exact round trips, re-solving gives the run's answer, the index
describes the blocks the loop really changed, and the `icbs export-qubos` command."""

import csv

import dimod
import numpy as np
import pytest
import torch

from icbs import Budget, Pruner, Settings
from icbs.cli import main
from icbs.export import IndexWriter, RecordingSolver, bits, export_run, from_bits, load_exported
from solvers import CardinalityQUBO, get_solver


@pytest.fixture
def make_pruner(tiny_model_and_data):
    def make(block_size=8, objective="layerwise", solver="anneal", seed=0):
        model, data = tiny_model_and_data(seed)
        settings = Settings(sparsity=0.6, objective=objective, block_size=block_size,
                            seed=seed)
        return Pruner(model, data, settings, solver=solver)

    return make


def test_bits_round_trip():
    x = np.array([0, 1, 1, 0, 1], dtype=np.int8)
    assert bits(x) == "01101"
    assert from_bits(bits(x)).tolist() == x.tolist()
    assert bits(None) == ""


def test_recording_solver_passes_through_and_keeps_the_cap():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((8, 8))
    p = CardinalityQUBO(A + A.T, 3)
    inner = get_solver("dimod", sampler=dimod.ExactSolver(), max_variables=9)
    rec = RecordingSolver(inner)
    assert rec.max_variables == 9 and rec.name == "dimod"
    x0 = p.magnitude_start()
    r = rec.solve(p, x0=x0, seed=4)
    assert r.energy == pytest.approx(get_solver("exhaustive").solve(p).energy)
    (call,) = rec.calls
    assert call.problem is p and call.seed == 4 and call.x0.tolist() == x0.tolist()


def test_export_round_trip_is_exact_and_resolving_gives_the_runs_answer(tmp_path, make_pruner):
    pruner = make_pruner()
    recorder = RecordingSolver(pruner.solver)
    pruner.solver = recorder
    seen = []  # what the solver was handed, independent of the files
    with IndexWriter(tmp_path) as writer:
        def keep(p, record):
            call = recorder.calls.pop()
            seen.append(call)
            writer.write("t", call, step=record.step, layer=record.layer, block=p.last_block,
                         delta=record.delta, accepted=record.accepted, solver="anneal")
        pruner.run(Budget(steps=6), callback=keep, progress=False)
    blocks = list(load_exported(tmp_path))
    assert len(blocks) == len(seen) == 6
    anneal = get_solver("anneal")
    for b, call in zip(blocks, seen, strict=True):
        p, q = b.problem, call.problem
        # npz: bit for bit
        assert np.array_equal(p.Q, q.Q) and np.array_equal(p.k, q.k)
        assert np.array_equal(p.groups, q.groups) and p.const == q.const
        # UBQP text: the same matrix, exactly (values written with 17 digits)
        u = CardinalityQUBO.read_ubqp(tmp_path / b.row["ubqp"], q.k, q.groups, q.const)
        assert np.array_equal(u.Q, q.Q)
        # states and energies as in the run
        assert b.x_current.tolist() == call.x0.tolist()
        assert b.x_answer.tolist() == call.result.x.tolist()
        assert float(b.row["energy_answer"]) == call.result.energy
        xa = b.x_answer.astype(float)
        assert float(b.row["energy_answer"]) == pytest.approx(xa @ q.Q @ xa + q.const, rel=1e-12)
        # re-solving the exported block with the run's solver and seed gives the same answer
        again = anneal.solve(p, x0=b.x_current, seed=int(b.row["seed"]))
        assert again.energy == float(b.row["energy_answer"])
        assert again.x.tolist() == b.x_answer.tolist()
        # and the exact optimum is no better than what the run found on these small blocks
        if p.num_feasible() <= 5000:
            assert get_solver("exhaustive").solve(p).energy >= again.energy - 1e-9


def test_index_rows_describe_the_blocks_the_loop_changed(tmp_path, make_pruner):
    """Independent truth: the layer masks before and after each step."""
    pruner = make_pruner(block_size=10, objective="layerwise")
    masks = {layer.name: layer.mask.clone() for layer in pruner.layers}
    with IndexWriter(tmp_path, ubqp=False) as writer:
        for _ in range(8):
            before = {layer.name: layer.mask.clone() for layer in pruner.layers}
            error_before = pruner.estimator.objective(pruner.layers)
            (row,) = export_run(pruner, 1, writer, "x", progress=False)
            layer = next(ly for ly in pruner.layers if ly.name == row["layer"])
            block = np.array(row["block"].split(), dtype=np.int64)
            assert len(block) == row["n"]
            pruned_before = ~before[layer.name].flatten()[block].numpy()
            assert from_bits(row["x_current"]).tolist() == pruned_before.astype(int).tolist()
            after = layer.mask.flatten()
            outside = np.setdiff1d(np.arange(after.numel()), block)
            assert torch.equal(after[outside], before[layer.name].flatten()[outside])
            expected = from_bits(row["x_answer"]) if row["accepted"] else pruned_before
            assert (~after[block]).numpy().astype(int).tolist() == list(expected)
            # the layerwise model is exact: the recorded dL is the true change of the error
            error_after = pruner.estimator.objective(pruner.layers)
            if row["accepted"]:
                assert error_after - error_before == pytest.approx(float(row["delta"]),
                                                                   rel=1e-4, abs=1e-6)
            else:
                assert error_after == pytest.approx(error_before, rel=1e-12)
    assert any(not torch.equal(m, ly.mask) for ly, m in
               zip(pruner.layers, masks.values(), strict=True))
    with open(tmp_path / "index.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8


def test_export_command_writes_every_block_size(tmp_path, capsys):
    out = tmp_path / "q"
    main(["export-qubos", "--block-size", "16", "40", "--steps", "2", "--out", str(out)])
    assert "wrote 4 block problems" in capsys.readouterr().out
    blocks = list(load_exported(out))
    assert sorted(int(b.row["n"]) for b in blocks) == [16, 16, 40, 40]
    for b in blocks:
        assert b.row["tag"] == f"digits_b{b.problem.n}"
        assert b.problem.is_feasible(b.x_current) and b.problem.is_feasible(b.x_answer)
        assert (out / b.row["ubqp"]).stat().st_size > 0
        assert b.row["layer"] in {"0", "2", "4"}
    with pytest.raises(SystemExit):
        main(["export-qubos", "--steps", "0", "--out", str(out)])
