"""Scale: `icbs prune` holds one decoder block at a time and can farm a block's layers out to
Ray workers; on the tiny LLaMA of test_llm, against the in-memory pruning as the truth."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
from test_llm import TEXT, _tiny_llama_dir  # noqa: E402

from icbs.cli import main  # noqa: E402
from icbs.distributed import LocalExecutor  # noqa: E402
from icbs.layer_pruning import LayerPruner  # noqa: E402
from icbs.llm.data import eval_windows, read_text, tokenize  # noqa: E402
from icbs.llm.evaluate import perplexity, window_nll  # noqa: E402
from icbs.llm.lazy import LazyModel  # noqa: E402
from icbs.llm.load import load_model  # noqa: E402
from icbs.llm.prune import LLMPruneSettings, prune_model  # noqa: E402
from icbs.masks import mask_matches_pattern, parse_pattern  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    (root / "story.txt").write_text(TEXT * 3, encoding="utf-8")
    return {"model": _tiny_llama_dir(root / "tiny", bos=False), "text": root / "story.txt"}


def _args(files, out, *extra):
    return ["prune", "--model", str(files["model"]), "--calib", str(files["text"]),
            "--nsamples", "4", "--seqlen", "32", "--threads", "1", "--out", str(out), *extra]


def _weights(directory):
    tensors = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.parametrize("order", ["block", "true_sequential", "dense_targets"])
def test_block_at_a_time_pruning_equals_pruning_the_loaded_model(files, tmp_path, monkeypatch,
                                                                 order):
    resident = []
    load_block = LazyModel.load_block

    def counting_load_block(self, index):
        block = load_block(self, index)
        resident.append(sum(any(not p.is_meta for p in b.parameters()) for b in self.blocks))
        return block

    monkeypatch.setattr(LazyModel, "load_block", counting_load_block)
    out = tmp_path / "out"
    flags = [] if order == "block" else ["--" + order.replace("_", "-")]
    main(_args(files, out, "--method", "sparsegpt", "--pattern", "2:4", "--sparsegpt-columns",
               "16", "--eval-text", str(files["text"]), "--max-tokens", "512", *flags))
    assert resident == [1, 1, 1, 1]  # two blocks pruned, then two evaluated, one at a time
    report = json.loads((out / "report.json").read_text())
    assert report["memory"]["peak_rss_bytes"] > 0

    model, tokenizer = load_model(files["model"], "cpu")
    settings = LLMPruneSettings(method="sparsegpt", pattern="2:4", nsamples=4, seqlen=32,
                                sparsegpt_columns=16, **({} if order == "block" else {order: True}))
    assert report["settings"]["true_sequential"] == (order == "true_sequential")
    expected = prune_model(model, tokenizer, settings, [files["text"]])
    written = _weights(out)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].keys() \
        == written.keys()
    state = model.state_dict()
    assert set(written) == set(state) - {"lm_head.weight"} or set(written) == set(state)
    for name, tensor in written.items():
        assert torch.equal(tensor, state[name]), name
    assert [r["error_after"] for r in report["layers"]] == \
        [r["error_after"] for r in expected["layers"]]
    windows = eval_windows(tokenize(tokenizer, read_text([files["text"]])), 32, 512)
    assert report["eval"]["perplexity"] == pytest.approx(perplexity(model, windows), rel=1e-6)
    assert report["eval"]["window_nll"] == pytest.approx(window_nll(model, windows).tolist(),
                                                         rel=1e-6)


def test_a_bfloat16_model_is_pruned_in_float32_and_written_in_bfloat16(files, tmp_path):
    source = tmp_path / "bf16"
    model, tokenizer = load_model(files["model"], "cpu")
    model.to(torch.bfloat16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    main(_args({**files, "model": source}, out, "--method", "wanda"))
    written = _weights(out)
    masks = load_file(str(out / "masks.safetensors"))
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    for name, mask in masks.items():
        assert torch.equal(written[f"{name}.weight"] != 0, mask)


def _run(args, home, check_no_ray=False):
    code = "import sys; from icbs.cli import main; main(sys.argv[1:])"
    if check_no_ray:
        code += "; assert 'ray' not in sys.modules, 'ray was imported'"
    return subprocess.Popen([sys.executable, "-c", code, *args], env={**os.environ, "HOME": home},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(out):
    report = json.loads((out / "report.json").read_text())
    return (_weights(out), load_file(str(out / "masks.safetensors")),
            [r["error_after"] for r in report["layers"]], report)


def _same(a, b):
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert a[2] == b[2]


def _ray_tasks():
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines()
            if line.split()[1:2] == ["ray::layer_job"]]


def test_ray_workers_give_the_same_result_even_when_one_is_killed(files, tmp_path):
    pytest.importorskip("ray")
    home = tmp_path / "home"
    home.mkdir()
    steps = ("--method", "icbs", "--steps", "1200", "--block-size", "32")
    runs = {name: _run(_args(files, tmp_path / name, *steps, *extra), str(home), not extra)
            for name, extra in (("local", ()), ("one", ("--workers", "1")))}
    for run in runs.values():
        assert run.wait(timeout=300) == 0, run.stderr.read()
    local = _result(tmp_path / "local")
    _same(_result(tmp_path / "one"), local)
    assert local[3]["workers"] is None and _result(tmp_path / "one")[3]["workers"] == 1

    run = _run(_args(files, tmp_path / "two", *steps, "--workers", "2"), str(home))
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and run.poll() is None:
        tasks = _ray_tasks()
        if tasks:
            time.sleep(0.3)  # well inside the task (each takes a second or more)
            killed = tasks[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    assert killed is not None, "no Ray task was seen running"
    assert run.wait(timeout=300) == 0, run.stderr.read()
    _same(_result(tmp_path / "two"), local)
    assert not (home / ".ray").exists()  # the embedded instance's token stayed in memory


def test_workers_and_an_address_together_are_refused(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_args(files, tmp_path / "o", "--workers", "2", "--ray-address", "auto"))
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_args(files, tmp_path / "o", "--workers", "0"))
    assert "--workers must be >= 1" in capsys.readouterr().err


class _EightWorkers(LocalExecutor):
    """Runs here, but says it has eight workers, so that layers go out in row parts."""

    parallel = 8


def test_layers_split_into_row_parts_for_many_workers_stay_valid_and_deterministic(files):
    results = []
    for _ in range(2):
        model, tokenizer = load_model(files["model"], "cpu")
        settings = LLMPruneSettings(method="icbs", pattern="per_output", nsamples=4, seqlen=32,
                                    steps=600, block_size=16)
        report = prune_model(model, tokenizer, settings, [files["text"]],
                             layer_pruner=lambda s, total: LayerPruner(
                                 s, total, executor=_EightWorkers()))
        results.append((report, model.state_dict()))
    report, state = results[0]
    parts = {r["name"]: r.get("row_parts", 1) for r in report["layers"]}
    assert parts["model.layers.0.mlp.down_proj"] == 2  # 8192 weights > 36864 / 8
    assert parts["model.layers.0.self_attn.k_proj"] == 1
    for record in report["layers"]:
        assert mask_matches_pattern(report["masks"][record["name"]], parse_pattern("per_output"),
                                    0.5)
        assert record["error_after"] < record["error_before"]
    assert sum(r["steps"] for r in report["layers"]) == pytest.approx(600, abs=30)
    assert all(torch.equal(state[k], results[1][1][k]) for k in state)


def test_embedded_ray_workers_run_at_the_drivers_priority(tmp_path):
    """Ray's default (nice 15) starves the layer jobs beside any busy process."""
    pytest.importorskip("ray")
    code = ("import os; from icbs.distributed import RayExecutor; e = RayExecutor(workers=1); "
            "print(e.map(lambda: os.nice(0), [()])[0], os.nice(0)); e.close()")
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_worker_niceness", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    worker, driver = out.stdout.split()
    assert worker == driver
