"""Sample images on disk: the uint8 quantization every image metric sees, PNG grids, 2-D scatter plots.

Written through `fewstep.fileio.atomic_path`: a reader never sees half a PNG."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .fileio import atomic_path


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 images, the quantization every image metric sees."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """N x C x H x W in [-1, 1] -> one PNG grid (2-px gaps)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = to_uint8(images.detach().cpu())
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    pad = 2
    grid = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr[..., 0] if c == 1 else arr).save(tmp, format="PNG")
    return path


def save_points_plot(points: torch.Tensor, path: Path, reference: torch.Tensor | None = None) -> Path:
    """2-D samples (GMM) as a scatter plot, the 'grid' of vector datasets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.3, c="gray", label="data")
    ax.scatter(points[:, 0].cpu(), points[:, 1].cpu(), s=2, alpha=0.5, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)
