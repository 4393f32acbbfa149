"""task=train_classifier: train the small CNN whose penultimate features give the fast FID.

    python run.py task=train_classifier dataset=fashion_mnist

Plain PyTorch, deterministic for a given seed on a given machine (seeded init, a
seeded shuffling generator, no data augmentation). Adam with a one-cycle learning
rate, cross-entropy. Writes model.safetensors + config.json (architecture, test
accuracy, training settings) to task.out_dir. Any labelled image dataset works.
"""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from fewstep.metrics.classifier import SmallCNN, save_classifier

log = logging.getLogger(__name__)


def _check(cfg_task):
    for key in ("epochs", "batch_size"):
        if int(cfg_task[key]) < 1:
            raise ValueError(f"task.{key} must be >= 1, got {cfg_task[key]}")
    if not float(cfg_task.lr) > 0:
        raise ValueError(f"task.lr must be > 0, got {cfg_task.lr}")


@torch.no_grad()
def accuracy(model, x, y, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train(model, x, y, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int):
    """Adam + one-cycle schedule over `epochs` passes of seeded shuffles; returns per-epoch mean losses."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    losses = []
    for epoch in range(epochs):
        model.train()
        perm, total, t0 = torch.randperm(len(x), generator=gen), 0.0, time.time()
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
        log.info("epoch %d: loss %.4f (%.0f s)", epoch + 1, losses[-1], time.time() - t0)
    return losses


def run(cfg) -> dict:
    from fewstep.data import load_dataset

    t = cfg.task
    _check(t)
    t0 = time.time()
    x, y = load_dataset(cfg.dataset, "train", with_labels=True)
    x_test, y_test = load_dataset(cfg.dataset, "test", with_labels=True)
    if x.ndim != 4:
        raise ValueError(f"train_classifier needs an image dataset (N x C x H x W), got shape {tuple(x.shape)}")
    if t.max_train:
        x, y = x[: int(t.max_train)], y[: int(t.max_train)]
    num_classes = int(max(y.max(), y_test.max())) + 1
    seed = int(t.seed)
    torch.manual_seed(seed)
    model = SmallCNN(x.shape[1], list(t.channels), int(t.feature_dim), num_classes, float(t.dropout))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("SmallCNN: %d parameters, %d train / %d test images", n_params, len(x), len(x_test))
    losses = train(model, x, y, int(t.epochs), int(t.batch_size), float(t.lr), float(t.weight_decay), seed)
    test_acc, train_acc = accuracy(model, x_test, y_test), accuracy(model, x[:10000], y[:10000])
    seconds = time.time() - t0
    info = dict(dataset=str(cfg.dataset.name), image_size=int(x.shape[-1]), test_accuracy=round(test_acc, 4),
                train_accuracy_first_10k=round(train_acc, 4), n_train=len(x), n_test=len(x_test),
                parameters=n_params, train=dict(epochs=int(t.epochs), batch_size=int(t.batch_size), lr=float(t.lr),
                                                weight_decay=float(t.weight_decay), seed=seed,
                                                final_loss=round(losses[-1], 4), seconds=round(seconds, 1)))
    folder = save_classifier(model, t.out_dir, info)
    log.info("test accuracy %.4f; saved to %s", test_acc, folder)
    return dict(test_accuracy=test_acc, train_accuracy=train_acc, final_loss=losses[-1], parameters=n_params,
                seconds=seconds, out_dir=str(folder))
