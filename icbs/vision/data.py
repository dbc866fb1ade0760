"""Fashion-MNIST from its IDX files (Debian's `dataset-fashion-mnist` installs them)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# mean and standard deviation of the training pixels in [0, 1]
MEAN, STD = 0.2860, 0.3530


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX array (uint8 data; gzip or plain): magic 0x0000 0x08 ndim, then big-endian
    32-bit sizes, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise ValueError(f"{path}: header says {shape} ({size} bytes) but the file holds "
                         f"{len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@dataclass
class ImageData:
    """Normalized images (n, 1, 28, 28) float32 and labels (n,) int64, train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_fashion_mnist(directory: str | Path = DEFAULT_DIR) -> ImageData:
    """The four Fashion-MNIST files in `directory`, pixels normalized by the training
    set's mean and standard deviation."""
    directory = Path(directory)
    missing = [name for pair in FILES.values() for name in pair if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {missing}; install Fashion-MNIST with "
                                "`apt-get install -y dataset-fashion-mnist` or pass its directory")
    arrays = []
    for images, labels in FILES.values():
        x = read_idx(directory / images)
        y = read_idx(directory / labels)
        if x.ndim != 3 or y.shape != (x.shape[0],):
            raise ValueError(f"{directory}: {images} {x.shape} does not match {labels} {y.shape}")
        x = (torch.from_numpy(x.astype(np.float32) / 255.0) - MEAN) / STD
        arrays += [x.unsqueeze(1), torch.from_numpy(y.astype(np.int64))]
    return ImageData(*arrays)
