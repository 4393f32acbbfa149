"""The condition of each sample, decided by config and by the sample's index alone.

`labels` (config key) for a class-conditional network with C classes:

    balanced   sample i gets class i mod C (equal counts for n_samples a multiple of C; the default)
    grouped    sample i of n gets class floor(i C / n): consecutive blocks, so a sample grid whose rows hold
               n / C images has one class per row
    random     sample i draws its class from its own generator, seeded from (seed, i) on a stream of its
               own (samplers/noise.py), so the noise of sample i is the same as without labels
    k          every sample gets class k (0 <= k < C)

Like the noise, a sample's label depends on its index only: not on batch size, batch order or the
number of processes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import check
from .samplers.noise import sample_seed

LABEL_STREAM = 7        # the stream of sample_seed used for labels=random (0 is the samplers' noise)
RULES = ("balanced", "grouped", "random")


def check_labels(rule, num_classes: int) -> None:
    """One-line ConfigError for a labels rule that does not fit C = num_classes classes."""
    if isinstance(rule, int) and not isinstance(rule, bool):
        check(0 <= rule < num_classes, f"labels={rule} is not a class of this network (0..{num_classes - 1})")
    else:
        check(isinstance(rule, str) and rule in RULES,
              f"labels must be balanced, grouped, random or a class index 0..{num_classes - 1} (got {rule!r})")


def sample_labels(rule, seed: int, indices: Sequence[int], num_classes: int, device="cpu",
                  n_samples: int | None = None) -> torch.Tensor:
    """The class labels (int64) of the samples with these global indices (n_samples: the run's total, for
    labels=grouped)."""
    check_labels(rule, num_classes)
    idx = [int(i) for i in indices]
    if rule == "balanced":
        y = [i % num_classes for i in idx]
    elif rule == "grouped":
        if not n_samples:
            raise ValueError("labels=grouped needs the run's n_samples")
        y = [i * num_classes // int(n_samples) for i in idx]
    elif rule == "random":
        y = [int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(
            sample_seed(seed, i, LABEL_STREAM)))) for i in idx]
    else:
        y = [int(rule)] * len(idx)
    return torch.tensor(y, dtype=torch.long, device=device)


def condition_digest(cond: dict) -> str:
    """sha256 (16 hex digits) of a batch's condition tensors ({} -> the digest of nothing): what a file made
    under that condition (tune_rho's teacher targets) is keyed by."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(cond):
        t = cond[k].detach().cpu().contiguous()
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update((t if t.dtype in (torch.int64, torch.float32) else t.float()).numpy().tobytes())
    return h.hexdigest()[:16]
