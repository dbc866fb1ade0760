"""Bad input, API and CLI: a clear message, exit code 2 on the CLI, and nothing changed or
written (the model keeps its dense weights, --out and its work directory do not appear, an
existing export index is left as it was)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import icbs
from icbs import Budget, Pruner, Settings
from icbs.cli import main
from solvers import CardinalityQUBO, get_solver

pytest.importorskip("transformers")
from test_llm import TEXT, _tiny_llama_dir  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    text = root / "story.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    binary = root / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    a_file = root / "a_file"
    a_file.write_text("not a directory")
    model = _tiny_llama_dir(root / "tiny", bos=False)
    pickled = root / "pickled"
    pickled.mkdir()
    for f in model.iterdir():
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    nan_model = _tiny_llama_dir(root / "nan", bos=False)
    from safetensors.torch import load_file, save_file

    weights = load_file(nan_model / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, nan_model / "model.safetensors", metadata={"format": "pt"})
    return {"text": text, "binary": binary, "file": a_file, "model": model,
            "pickled": pickled, "nan": nan_model}


def _prune_args(files, out, **changes):
    args = {"--model": files["model"], "--method": "wanda", "--calib": files["text"],
            "--nsamples": "4", "--seqlen": "32", "--out": out}
    args.update(changes)
    argv = ["prune"]
    for flag, value in args.items():
        if value is True:  # a switch
            argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _refused(argv, capsys, match):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if "error:" in line]
    assert message and __import__("re").search(match, message[-1]), err
    return message[-1]


PRUNE_CASES = [
    ({"--sparsity": "1.5"}, "sparsity must be a fraction strictly between 0 and 1"),
    ({"--sparsity": "nan"}, "sparsity must be a fraction"),
    ({"--sparsity": "0"}, "sparsity must be a fraction"),
    ({"--pattern": "3:2"}, "unknown sparsity pattern '3:2'"),
    ({"--pattern": "2:4", "--sparsity": "0.7"}, "pattern 2:4 prunes 0.5 .* not the sparsity 0.7"),
    ({"--sparsity": "0.999"}, "prunes all 64 weights of every group"),
    ({"--pattern": "unstructured", "--sparsity": "0.99999"}, "prunes all .* weights"),
    ({"--device": "foo"}, "--device 'foo': expected cpu, cuda or cuda:N"),
    ({"--threads": "-1"}, "--threads must be >= 1, got -1"),
    ({"--threads": "0"}, "--threads must be >= 1, got 0"),
    ({"--batch-size": "0"}, "--batch-size must be >= 1, got 0"),
    ({"--batch-size": "-1"}, "--batch-size must be >= 1, got -1"),
    ({"--method": "icbs", "--block-size": "0"}, "block_size must be an integer >= 2, got 0"),
    ({"--method": "icbs", "--block-size": "1"}, "block_size must be an integer >= 2, got 1"),
    ({"--budget": "nan"}, "budget must be a finite number >= 0, got nan"),
    ({"--budget": "-5"}, "budget must be a finite number >= 0, got -5"),
    ({"--mask-damp": "nan"}, "mask_damp must be a finite number >= 0, got nan"),
    ({"--percdamp": "-1"}, "percdamp must be a finite number >= 0"),
    ({"--dense-targets": True, "--target-damp": "-1"},
     "target_damp must be a finite number >= 0"),
    ({"--nsamples": "0"}, "nsamples must be an integer >= 1, got 0"),
    ({"--seqlen": "1"}, "--seqlen must be >= 2, got 1"),
    ({"--seed": "-1"}, "seed must be an integer >= 0, got -1"),
    ({"--sparsegpt-columns": "0"}, "sparsegpt_columns must be an integer >= 1, got 0"),
    ({"--method": "icbs", "--objective": "refit", "--refit-batch-elements": "0"},
     "refit_batch_elements must be an integer >= 1, got 0"),
    ({"--method": "icbs", "--steps": "0"}, "steps must be an integer >= 1, got 0"),
    ({"--method": "icbs", "--pattern": "unstructured", "--batched-steps": True},
     "batched_steps needs a per-row count"),
    ({"--method": "magnitude", "--dense-targets": True},
     "dense_targets fits layers to calibration outputs"),
    ({"--calib": "missing.txt"}, "text file not found: missing.txt"),
    ({"--calib": "BINARY"}, "weights.bin is not UTF-8 text"),
    ({"--eval-text": "BINARY"}, "weights.bin is not UTF-8 text"),
    ({"--max-tokens": "1"}, "--max-tokens must be >= 2, got 1"),
    ({"--out": "FILE"}, "--out .*a_file is an existing file; give a directory"),
    ({"--model": "missing_dir"}, "expected a Hugging Face model directory"),
    ({"--model": "PICKLED"}, r"no safetensors weights \(only \['pytorch_model.bin'\]\)"),
    ({"--include": "nothing.*"}, "no linear layer matches"),
    ({"--bos": "yes"}, "--bos yes: the tokenizer has no BOS token"),
    ({"--model": "NAN", "--method": "magnitude"}, "up_proj: the weights have NaN or Inf"),
    ({"--model": "NAN", "--method": "sparsegpt"}, "up_proj: the weights have NaN or Inf"),
]
if not torch.cuda.is_available():
    PRUNE_CASES.append(({"--device": "cuda"}, "--device cuda: this torch has no CUDA device"))


@pytest.mark.parametrize("changes,match", PRUNE_CASES, ids=lambda c: str(c)[:40])
def test_cli_prune_refuses_bad_input_and_writes_nothing(files, tmp_path, capsys, changes,
                                                        match):
    names = {"BINARY": files["binary"], "FILE": files["file"], "PICKLED": files["pickled"],
             "NAN": files["nan"]}
    changes = {k: names.get(v, v) for k, v in changes.items()}
    out = tmp_path / "out"
    _refused(_prune_args(files, out, **changes), capsys, match)
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    assert files["file"].read_text() == "not a directory"


@pytest.mark.parametrize("argv,match", [
    (["--text", "BINARY"], "weights.bin is not UTF-8 text"),
    (["--text", "TEXT", "--device", "foo"], "--device 'foo'"),
    (["--text", "TEXT", "--threads", "0"], "--threads must be >= 1"),
    (["--text", "TEXT", "--seqlen", "1"], "--seqlen must be >= 2"),
])
def test_cli_eval_refuses_bad_input(files, capsys, argv, match):
    argv = [{"BINARY": files["binary"], "TEXT": files["text"]}.get(a, a) for a in argv]
    _refused(["eval", "--model", files["model"], *argv], capsys, match)


@pytest.mark.parametrize("argv,match", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--block-size", "64", "1"], "block_size must be an integer >= 2, got 1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--sparsity", "1"], "sparsity must be a fraction"),
    (["--solver", "nope"], "unknown solver 'nope'"),
])
def test_export_qubos_refuses_bad_flags_before_touching_an_existing_index(tmp_path, capsys,
                                                                         argv, match):
    index = tmp_path / "index.csv"
    index.write_text("an earlier export\n")
    _refused(["export-qubos", "--out", tmp_path, *argv], capsys, match)
    assert index.read_text() == "an earlier export\n"


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(targets=None, width=6):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, width, generator=gen)
    return [(x, torch.randint(0, 3, (32,), generator=gen) if targets is None else targets)]


class _WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        return self.used(x)


API_CASES = [
    ("unused layer", _WithUnusedLayer, dict(objective="fisher"), None,
     r"layers never used in the model's forward pass: \['unused'\]"),
    ("targets out of range", _mlp, {}, _data(targets=torch.full((32,), 7)),
     "cannot be run on calibration batch 0 .*out of bounds"),
    ("input width", _mlp, {}, _data(width=5), r"cannot be run on calibration batch 0 \(inputs "
     r"\(32, 5\)"),
    ("negative seed", _mlp, dict(seed=-3), None, "seed must be an integer >= 0, got -3"),
    ("whole rows", _mlp, dict(sparsity=0.95, pattern="per_output"), None,
     "prunes all 6 weights of every group"),
    ("nan data", _mlp, {}, [(torch.full((4, 6), math.nan), torch.zeros(4, dtype=torch.long))],
     "NaN or Inf inputs"),
    ("no data", _mlp, {}, [], "calibration data is empty"),
    ("bad pattern for the shape", _mlp, dict(pattern="4:8"), None, "not a multiple of M=8"),
]


@pytest.mark.parametrize("name,make,settings,data,match", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input_before_any_weight_moves(name, make, settings, data, match):
    model = make()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    settings = {"sparsity": 0.5, **settings}
    with pytest.raises(ValueError, match=match):
        icbs.prune(model, _data() if data is None else data, budget=Budget(steps=3),
                   progress=False, **settings)
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_api_refuses_a_checkpoint_path_that_is_a_directory(tmp_path):
    model = _mlp()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        icbs.prune(model, _data(), sparsity=0.5, budget=Budget(steps=3), checkpoint=tmp_path,
                   progress=False)
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="is a directory"):
        Pruner(_mlp(), _data(), Settings(sparsity=0.5)).run(Budget(steps=1), checkpoint=tmp_path,
                                                            progress=False)


def test_a_q_near_the_float64_limit_symmetrizes_finite_and_overflowing_energies_are_refused():
    big = np.finfo(np.float64).max
    q = np.array([[1.0, big / 4], [big / 4.5, 1.0]])  # Q + Q^T alone would overflow
    problem = CardinalityQUBO(q, 1)
    assert np.isfinite(problem.Q).all() and problem.Q[0, 1] == problem.Q[1, 0]
    assert get_solver("exhaustive").solve(problem).energy == 1.0
    with pytest.raises(ValueError, match=r"sum \|Q_ij\| overflows float64"):
        CardinalityQUBO(np.array([[1.0, big], [big * 0.9999, 1.0]]), 1)
    with pytest.raises(ValueError, match="Q must be finite"):
        CardinalityQUBO(np.array([[math.nan, 0.0], [0.0, 1.0]]), 1)


def test_both_settings_types_refuse_an_n_m_pattern_with_another_sparsity():
    from icbs.llm.prune import LLMPruneSettings

    with pytest.raises(ValueError, match="pattern 2:4 prunes 0.5 of the weights, not the "
                                         "sparsity 0.7"):
        Settings(sparsity=0.7, pattern="2:4")
    with pytest.raises(ValueError, match="pattern 1:4 prunes 0.75 of the weights"):
        LLMPruneSettings(pattern="1:4", sparsity=0.5)
    assert LLMPruneSettings(pattern="1:4").sparsity == 0.75
    assert Settings(sparsity=0.5, pattern="2:4").sparsity == 0.5
