"""Datasets (tensors in [-1, 1]) and the Lightning data module (imported lazily: lightning is slow to load)."""
from .datasets import (DatasetMissing, build_mixture, dataset_shape, load_cifar10, load_dataset, load_digits,
                       load_fashion_mnist, load_gmm, load_image_folder, load_mnist5k)

__all__ = ["DatasetMissing", "DiffusionDataModule", "build_mixture", "dataset_shape", "load_cifar10",
           "load_dataset", "load_digits", "load_fashion_mnist", "load_gmm", "load_image_folder", "load_mnist5k"]


def __getattr__(name):
    if name == "DiffusionDataModule":
        from .datamodule import DiffusionDataModule
        return DiffusionDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
