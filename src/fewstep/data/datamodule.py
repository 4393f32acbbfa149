"""Lightning data module over the in-memory tensors of `load_dataset`.

Batches are tuples: `(x,)`, or `(x, labels)` with `with_labels=True`; a training step reads `batch[0]`.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .datasets import dataset_shape, load_dataset


class RandomHFlip(Dataset):
    """Wraps a TensorDataset; mirrors each image left-right with probability 1/2 (image data only)."""

    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, *rest = self.base[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x, *rest)


class DiffusionDataModule(L.LightningDataModule):
    """Train / validation loaders for a diffusion training task.

    Validation data, pick one:
      val_split="test"    the dataset's own test split (use it when the held-out set matters, e.g. FID);
      val_fraction=0.05   a fixed random hold-out of the train split, drawn with `seed` (the default);
      val_fraction=0      no validation (val_dataloader returns []).
    hflip=True adds random horizontal flips to training images (natural images only, not digits).
    Training batches all have batch_size rows (the last, short one of an epoch is dropped).
    """

    def __init__(self, cfg_dataset, batch_size: int = 128, num_workers: int = 0, val_fraction: float = 0.05,
                 val_split: str | None = None, seed: int = 0, hflip: bool = False, with_labels: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_split not in (None, "train", "test"):
            raise ValueError(f"val_split must be None, 'train' or 'test', got {val_split!r}")
        self.shape = dataset_shape(cfg_dataset)   # also validates the config before any loading
        if hflip and len(self.shape) != 3:
            raise ValueError("hflip needs image data (C x H x W); this dataset has shape " + str(self.shape))
        self.cfg_dataset = cfg_dataset
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.val_fraction, self.val_split = float(val_fraction), val_split
        self.seed, self.hflip, self.with_labels = int(seed), bool(hflip), bool(with_labels)
        self.train_set = self.val_set = None

    def _load(self, split: str) -> TensorDataset:
        out = load_dataset(self.cfg_dataset, split, with_labels=self.with_labels)
        return TensorDataset(*out) if self.with_labels else TensorDataset(out)

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        train = self._load("train")
        if self.val_split is not None:
            self.train_set, self.val_set = train, self._load(self.val_split)
        elif self.val_fraction > 0:
            n = len(train)
            n_val = max(1, int(round(self.val_fraction * n)))
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            self.val_set = TensorDataset(*(t[perm[:n_val]] for t in train.tensors))
            self.train_set = TensorDataset(*(t[perm[n_val:]] for t in train.tensors))
        else:
            self.train_set, self.val_set = train, None

    def _loader(self, data, shuffle: bool) -> DataLoader:
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=shuffle,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        data = RandomHFlip(self.train_set) if self.hflip else self.train_set
        return self._loader(data, shuffle=True)

    def val_dataloader(self):
        self.setup()
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
