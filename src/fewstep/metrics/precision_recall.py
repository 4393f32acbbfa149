"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models").

Each set of feature vectors approximates its manifold by the union of balls centred
at its points, with radius the distance to the point's k-th nearest neighbour in the
same set (k = 3 in the paper):

    f(phi, Phi) = 1  if  ||phi - phi'||_2 <= ||phi' - NN_k(phi')||_2  for some phi' in Phi,  else 0
    precision   = mean over fake  phi_g of f(phi_g, Phi_real)   (fakes that look real: fidelity)
    recall      = mean over real  phi_r of f(phi_r, Phi_fake)   (reals the model covers: diversity)

Both are biased by the set sizes, so compare runs with the same numbers of real and
fake features (fewstep.metrics.Metrics uses as many real rows as fake samples).
"""
from __future__ import annotations

import torch


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ||a||^2 + ||b||^2 - 2 a.b (float32 matmul, clipped at 0)."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.t() + (b * b).sum(1)[None]).clamp_min_(0)


def knn_radii(feats: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Squared distance of every row to its k-th nearest neighbour among the other rows."""
    if not 1 <= k < len(feats):
        raise ValueError(f"k-NN radii need 1 <= k < number of points, got k={k} for {len(feats)} points")
    out = [_sq_dists(feats[i:i + chunk], feats).kthvalue(k + 1, dim=1).values  # k + 1: the row itself is at 0
           for i in range(0, len(feats), chunk)]
    return torch.cat(out)


def in_manifold(query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Bool per query row: inside at least one ball B(ref_j, radius_j)."""
    out = [(_sq_dists(query[i:i + chunk], ref) <= ref_radii[None]).any(1) for i in range(0, len(query), chunk)]
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of the fake feature set against the real one, both N x D."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall need two N x D feature sets, got {tuple(real.shape)} and {tuple(fake.shape)}")
    real, fake = real.float(), fake.float().to(real.device)
    precision = in_manifold(fake, real, knn_radii(real, k)).double().mean().item()
    recall = in_manifold(real, fake, knn_radii(fake, k)).double().mean().item()
    return precision, recall
