"""Fashion-MNIST files, the vision models and the vision experiment's quick mode."""

import csv
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from icbs.vision.data import FILES, load_fashion_mnist, read_idx
from icbs.vision.models import ResNet, ViT

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(directory: Path, train: int = 600, test: int = 200) -> None:
    """Images whose class is which of ten horizontal bands is bright, with noise."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label: 5 + 2 * label] += 180
        write_idx(directory / FILES[split][0], images)
        write_idx(directory / FILES[split][1], labels)


def test_idx_files_are_read_exactly_and_bad_ones_refused(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "b").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"\x00" * 12)
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="5 bytes.*2 data bytes"):
        read_idx(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_is_normalized_and_paired(tmp_path):
    fake_fashion_mnist(tmp_path, 50, 20)
    data = load_fashion_mnist(tmp_path)
    assert data.x_train.shape == (50, 1, 28, 28) and data.y_test.shape == (20,)
    raw = read_idx(tmp_path / FILES["train"][0])
    torch.testing.assert_close(data.x_train[3, 0] * 0.3530 + 0.2860,
                               torch.from_numpy(raw[3] / 255.0).float())


@pytest.mark.parametrize("model", [ViT(), ResNet()])
def test_vision_models_classify_a_batch(model):
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_the_vision_experiment_runs_in_quick_mode(tmp_path):
    fake_fashion_mnist(tmp_path / "data")
    env = dict(os.environ, ICBS_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "experiments" / "quality_time_vision.py"),
                    "--quick", "--threads", "1", "--data", str(tmp_path / "data"),
                    "--out", str(tmp_path / "out")], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=600)
    rows = list(csv.DictReader((tmp_path / "out" / "quality_time_quick.csv").open()))
    methods = {(r["model"], r["method"]) for r in rows}
    for model in ("vit", "resnet"):
        assert {(model, m) for m in ("dense", "magnitude", "wanda", "sparsegpt", "alps",
                                     "icbs-fisher", "icbs-refit")} <= methods
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        if r["method"] in ("sparsegpt", "alps", "icbs-refit"):
            assert float(r["layer_error"]) > 0
    assert (tmp_path / "out" / "quality_time_quick.png").stat().st_size > 0


def test_efficientnet_lite0_knows_the_photos_and_is_pruned_with_its_depthwise_convolutions():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("skimage")
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from fidelity_efficientnet import (
            fidelity,
            load_efficientnet_lite0,
            log_probs,
            photo,
            random_crops,
        )
    finally:
        sys.path.pop(0)
    import torch.nn.functional as F

    import icbs

    model = load_efficientnet_lite0()
    whole = torch.stack([F.interpolate(photo(name)[None], size=(224, 224), mode="bilinear",
                                       antialias=True)[0] for name in ("chelsea", "coffee")])
    # ImageNet classes 285 (Egyptian cat) and 967 (espresso), as the issue checked
    assert log_probs(model, (whole - 0.5) / 0.5).argmax(1).tolist() == [285, 967]
    crops = random_crops(["astronaut", "camera"], 4, seed=0)
    assert crops.shape == (4, 3, 224, 224)
    dense = log_probs(model, crops)
    assert fidelity(dense, dense) == (1.0, pytest.approx(0.0, abs=1e-6))
    report = icbs.prune_layer_by_layer(model, [(crops, torch.zeros(4))], sparsity=0.3,
                                       method="sparsegpt", include=("_blocks.1.*",))
    names = [r["name"] for r in report["layers"]]
    assert names == ["_blocks.1._expand_conv", "_blocks.1._depthwise_conv",
                     "_blocks.1._project_conv"]
    assert report["layers"][1]["groups"] == 96
    agreement, kl = fidelity(dense, log_probs(model, crops))
    assert kl > 0
