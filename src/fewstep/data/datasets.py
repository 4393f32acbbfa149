"""Datasets as tensors in [-1, 1], shape N x C x H x W (N x d for gmm)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


class DatasetMissing(FileNotFoundError):
    """A dataset file is absent; the message says how to get it."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W (x C) -> float N x C x H x W in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).float()
    if x.ndim == 3:
        x = x[:, None]
    return x / 127.5 - 1.0


def load_fashion_mnist(root: str = FASHION_MNIST_ROOT, split: str = "train", with_labels: bool = False):
    """Fashion-MNIST (Xiao et al. 2017) from the idx .gz files of the Debian package dataset-fashion-mnist."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"unknown split '{split}' for fashion_mnist (choose from train, test)")
    img = Path(root) / f"{prefix}-images-idx3-ubyte.gz"
    lab = Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists():
        raise DatasetMissing(f"Fashion-MNIST not found at {img}: install it with "
                             f"`apt-get install -y dataset-fashion-mnist` or set dataset.root")
    x = to_unit_range(_read_idx(img))
    if with_labels:
        return x, torch.from_numpy(_read_idx(lab).astype(np.int64))
    return x
