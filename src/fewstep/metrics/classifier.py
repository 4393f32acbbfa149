"""A small CNN classifier whose penultimate activations are a cheap FID feature space.

Inception-V3 features are the standard for FID but cost ~5.7 GMACs per image
(about 9 images/s on a 2-core CPU). For sweeps over samplers and strategies on a
small dataset, the 128-d penultimate layer of a classifier trained on that
dataset ranks samples just as well and is hundreds of times faster. Numbers in
this feature space are comparable only with each other (same checkpoint), never
with published Inception FIDs.

Architecture (about 240k parameters for 1 x 28 x 28 inputs):

    [conv3x3 -> BN -> ReLU -> maxpool2] x 3  (32, 64, 128 channels)
    adaptive avg pool to 3 x 3 -> flatten -> linear(1152, 128) -> ReLU   = features
    dropout -> linear(128, num_classes)                                 = logits

Saved as `model.safetensors` + `config.json` (architecture, dataset, test accuracy)
in one folder; `load_classifier(folder)` rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..fileio import atomic_path, write_text_atomic

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128), feature_dim: int = 128,
                 num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        if len(channels) < 1 or feature_dim < 1 or num_classes < 2:
            raise ValueError("SmallCNN needs >= 1 conv block, feature_dim >= 1 and num_classes >= 2")
        layers, c_in = [], in_channels
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=False)]
            c_in = c
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(3), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(c_in * 9, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.arch = dict(in_channels=in_channels, channels=list(channels), feature_dim=feature_dim,
                         num_classes=num_classes, dropout=dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (after ReLU), N x feature_dim. x: N x C x H x W in [-1, 1]."""
        return self.fc(self.conv(x))

    def features_and_logits(self, x: torch.Tensor):
        f = self.features(x)
        return f, self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def file_digest(path, n_hex: int = 16) -> str:
    """Short sha256 of a file: identifies the feature network a cached statistic was made with."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]


def save_classifier(model: SmallCNN, folder, info: dict) -> Path:
    """Write model.safetensors and config.json (arch + `info`, e.g. dataset and test_accuracy)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    cfg = dict(arch=model.arch, **info)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
    return folder


def load_classifier(folder, map_location="cpu"):
    """-> (SmallCNN in eval mode, config dict). Raises FileNotFoundError with the command that makes one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, cfg_file = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.exists() or not cfg_file.exists():
        raise FileNotFoundError(f"no feature classifier in {folder} (need {WEIGHTS_FILE} + {CONFIG_FILE}): train one with "
                                f"`python run.py task=train_classifier dataset=<name>` or use metrics=inception")
    cfg = json.loads(cfg_file.read_text())
    model = SmallCNN(**cfg["arch"])
    model.load_state_dict(load_file(str(weights), device=str(map_location)))
    return model.eval(), cfg
