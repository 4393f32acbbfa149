"""Frechet distance (FID), Inception Score, and cached reference statistics of the real data.

FID (Heusel et al. 2017): fit a Gaussian to the features of real and of generated
images and take the Frechet (2-Wasserstein) distance between the two Gaussians,

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2}).

`FID` is torchmetrics' FrechetInceptionDistance with a pluggable feature module
(fewstep.metrics.features) plus two additions: `update(features=...)` accumulates
features computed elsewhere (one feature pass feeds FID, precision/recall and IS),
and `load_reference(mu, cov, n)` puts cached real statistics into its states. The
states are torchmetrics states (sums reduced across processes), so DDP sync works;
the reference goes into rank 0 only so that the summed states stay exact.

Reference statistics (`RefStats`) are computed once per (dataset, split, feature,
image cap) and cached as an .npz: mean (float64), covariance (upper triangle,
float32), the image count, a capped random subset of feature rows for
precision/recall, and a json `meta` recording dataset / split / feature / the
digest of the feature network (a changed network makes the cache stale).
"""
from __future__ import annotations

import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from ..fileio import atomic_path

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the metric

class FID(FrechetInceptionDistance):
    """torchmetrics FID over a fewstep feature module; accepts precomputed features and cached real stats."""

    def __init__(self, feature: torch.nn.Module, **kwargs):
        kwargs.setdefault("reset_real_features", False)  # cached real stats survive reset()
        super().__init__(feature=feature, **kwargs)

    def update(self, imgs: Optional[torch.Tensor] = None, real: bool = False, *,
               features: Optional[torch.Tensor] = None) -> None:
        """Add images ([-1, 1], N x C x H x W) or their already computed `features` (N x D) to one side."""
        if features is None:
            features = self.inception(imgs)
        self.orig_dtype = torch.float64
        features = features.double()
        if features.dim() == 1:
            features = features.unsqueeze(0)
        if real:
            self.real_features_sum += features.sum(dim=0)
            self.real_features_cov_sum += features.t().mm(features)
            self.real_features_num_samples += features.shape[0]
        else:
            self.fake_features_sum += features.sum(dim=0)
            self.fake_features_cov_sum += features.t().mm(features)
            self.fake_features_num_samples += features.shape[0]

    def load_reference(self, mu, cov, n: int) -> None:
        """Set the real-side states to those of n samples with mean mu and (unbiased) covariance cov:
        sum = n mu, sum of x x^T = (n - 1) cov + n mu mu^T."""
        mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64, device=self.real_features_sum.device)
        cov = torch.as_tensor(np.asarray(cov), dtype=torch.float64, device=self.real_features_sum.device)
        if mu.shape != self.real_features_sum.shape or cov.shape != self.real_features_cov_sum.shape:
            raise ValueError(f"reference stats have dim {mu.shape[0]}, the feature network {self.real_features_sum.shape[0]}")
        self.real_features_sum = n * mu
        self.real_features_cov_sum = (n - 1) * cov + n * torch.outer(mu, mu)
        self.real_features_num_samples = torch.tensor(int(n), dtype=torch.long, device=mu.device)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """The Frechet distance between N(mu1, cov1) and N(mu2, cov2) with scipy's sqrtm (pytorch-fid's formula)."""
    import scipy.linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # singular product: regularize as pytorch-fid does
        offset = np.eye(len(cov1)) * 1e-6
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


class FrechetToReference:
    """FID of feature sets against one fixed Gaussian N(mu_ref, cov_ref), many times over: the reference's
    square root is taken once, and Tr (cov_ref cov)^(1/2) = sum of sqrt(eig(A cov A)) with A = cov_ref^(1/2)
    (A cov A is symmetric PSD, so eigvalsh; its eigenvalues are those of cov_ref cov)."""

    def __init__(self, mu_ref, cov_ref):
        self.mu = torch.as_tensor(np.asarray(mu_ref), dtype=torch.float64)
        cov = torch.as_tensor(np.asarray(cov_ref), dtype=torch.float64)
        w, V = torch.linalg.eigh((cov + cov.T) / 2)
        self.sqrt_cov = (V * w.clamp(min=0).sqrt()) @ V.T
        self.trace = float(cov.trace())

    def __call__(self, feats: torch.Tensor) -> float:
        """FID of the rows of feats (N x D) against the reference (unbiased covariance, as torchmetrics)."""
        x = feats.to(torch.float64)
        cov = torch.cov(x.T)
        ev = torch.linalg.eigvalsh(self.sqrt_cov @ cov @ self.sqrt_cov).clamp(min=0)
        return float((x.mean(0) - self.mu).square().sum() + cov.trace() + self.trace - 2 * ev.sqrt().sum())


def bootstrap_fid_se(feats: torch.Tensor, mu_ref, cov_ref, n_boot: int = 100, seed: int = 0) -> float:
    """Standard error of the FID of the generated rows `feats` (N x D): the standard deviation of the FID over
    n_boot resamples of the N rows with replacement, the reference statistics held fixed (they come from the
    far larger real set). It measures how much the FID would move with another draw of N samples from the
    same sampler -- the noise to compare two FIDs by (about sqrt(2) x this for two independent runs)."""
    return float(np.std(_bootstrap(FrechetToReference(mu_ref, cov_ref), n_boot, seed, feats), ddof=1))


def paired_fid_difference(feats_a: torch.Tensor, feats_b: torch.Tensor, mu_ref, cov_ref, n_boot: int = 200,
                          seed: int = 0):
    """FID(a) - FID(b) and its standard error for two runs whose row i comes from the same sample index (the
    same initial noise): the bootstrap resamples the indices jointly, so the noise the two runs share
    cancels, and differences far below sqrt(2) x fid_se become measurable. -> (difference, stderr)."""
    return fid_contrast([feats_a, feats_b], [1.0, -1.0], mu_ref, cov_ref, n_boot, seed)


def fid_contrast(feats: Sequence[torch.Tensor], weights: Sequence[float], mu_ref, cov_ref, n_boot: int = 200,
                 seed: int = 0):
    """sum_j weights[j] FID(feats[j]) and its standard error, for runs whose row i comes from the same sample
    index (the same initial noise): every bootstrap resample takes the same rows of every run, so the noise
    the runs share cancels in the combination as it does in a paired difference (weights 1, -1). With weights
    that sum to 0 it measures an effect, e.g. the interaction of a 2^k factorial: FID(all on) - FID(all off)
    - sum_i (FID(only i on) - FID(all off)), 0 when the effects add up. -> (value, stderr)."""
    return fid_contrasts(feats, [weights], mu_ref, cov_ref, n_boot, seed)[0]


def fid_contrasts(feats: Sequence[torch.Tensor], weight_rows: Sequence[Sequence[float]], mu_ref, cov_ref,
                  n_boot: int = 200, seed: int = 0) -> list:
    """fid_contrast for each row of weight_rows, from one set of FIDs and one bootstrap of the runs (each
    contrast the same combination of the same resamples). -> [(value, stderr), ...]."""
    if not feats or any(len(w) != len(feats) for w in weight_rows):
        raise ValueError(f"fid_contrast needs one weight per run (got {len(feats)} runs, weights "
                         f"{[len(w) for w in weight_rows]})")
    shapes = [tuple(f.shape) for f in feats]
    if len(set(shapes)) > 1:
        raise ValueError(f"paired runs need the same samples: feature rows {' vs '.join(map(str, shapes))}")
    fd = FrechetToReference(mu_ref, cov_ref)
    fids = [fd(f) for f in feats]
    reps = _bootstrap(fd, n_boot, seed, *feats)
    out = []
    for weights in weight_rows:
        w = np.asarray(weights, dtype=np.float64)
        out.append((float(np.dot(w, fids)), float(np.std(reps @ w, ddof=1))))
    return out


def _bootstrap(fd: FrechetToReference, n_boot: int, seed: int, *feats: torch.Tensor) -> np.ndarray:
    """n_boot x len(feats) FIDs (by fd) of row resamples with replacement; the same rows for every feature set."""
    if n_boot < 2:
        raise ValueError(f"the bootstrap needs n_boot >= 2 resamples (got {n_boot})")
    xs = [f.detach().cpu().to(torch.float64) for f in feats]
    n = len(xs[0])
    gen = torch.Generator().manual_seed(int(seed))
    out = np.empty((int(n_boot), len(xs)))
    for r in range(int(n_boot)):
        idx = torch.randint(n, (n,), generator=gen)
        out[r] = [fd(x[idx]) for x in xs]
    return out


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), mean and std over `splits` chunks."""
    if len(logits) < splits:
        raise ValueError(f"inception score needs at least splits={splits} samples, got {len(logits)}")
    logp = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for chunk in torch.tensor_split(logp, splits):
        log_py = torch.logsumexp(chunk, 0) - np.log(len(chunk))     # log of the marginal p(y) on the chunk
        kl = (chunk.exp() * (chunk - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- reference statistics

@dataclass
class RefStats:
    mu: np.ndarray                  # D, float64
    cov: np.ndarray                 # D x D, float64 (stored as a float32 upper triangle)
    n: int                          # images behind mu / cov
    pr_features: np.ndarray         # R x D random subset of the real feature rows (precision/recall)
    meta: dict = field(default_factory=dict)

    def save(self, path, pr_dtype: str = "float32") -> Path:
        """Atomic write of an .npz (no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        iu = np.triu_indices(len(self.mu))
        with atomic_path(path) as tmp, open(tmp, "wb") as f:   # a handle: np.savez adds no .npz to the name
            np.savez_compressed(f, mu=self.mu.astype(np.float64), cov_triu=self.cov[iu].astype(np.float32),
                                n=np.int64(self.n), pr_features=self.pr_features.astype(pr_dtype),
                                meta=np.array(json.dumps(dict(self.meta, n=int(self.n),
                                                              pr_rows=int(len(self.pr_features))))))
        return path

    @classmethod
    def load(cls, path) -> "RefStats":
        """Read a file written by `save`. One that is not (truncated, corrupt, a key or its json `meta` missing)
        or that holds a non-finite number (a nan in mu would crash the FID's eigendecomposition) is refused with
        a one-line ValueError that says how to remake it."""
        redo = "recompute it with task=ref_stats task.force=true (or delete it)"
        try:
            with np.load(path, allow_pickle=False) as z:
                mu = z["mu"].astype(np.float64)
                d = len(mu)
                cov = np.zeros((d, d))
                iu = np.triu_indices(d)
                cov[iu] = z["cov_triu"]
                cov = cov + np.triu(cov, 1).T
                ref = cls(mu, cov, int(z["n"]), z["pr_features"].astype(np.float32), json.loads(str(z["meta"])))
        except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
            why = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"reference statistics {path} cannot be read ({type(e).__name__}: {why}): "
                             f"{redo}") from None
        if not isinstance(ref.meta, dict):
            raise ValueError(f"reference statistics {path} have no json object as meta: {redo}")
        for name in ("mu", "cov", "pr_features"):
            if not np.isfinite(getattr(ref, name)).all():
                raise ValueError(f"reference statistics {path} hold non-finite numbers (inf or nan) in {name}: "
                                 f"{redo}")
        return ref


def ref_stats_path(cfg_metrics, cfg_dataset, feature_name: str) -> Path:
    """<ref_stats_dir>/<dataset>-<split>-<feature>-<cap or 'all'>.npz"""
    cap, split = cfg_metrics.ref_max_images, cfg_metrics.ref_split
    return Path(cfg_metrics.ref_stats_dir) / f"{cfg_dataset.name}-{split}-{feature_name}-{cap or 'all'}.npz"


@torch.no_grad()
def compute_ref_stats(extractor, images: torch.Tensor, max_images: Optional[int], pr_rows: int, batch_size: int,
                      seed: int, device="cpu", meta: Optional[dict] = None) -> RefStats:
    """Mean and covariance of extractor features over (a seeded random subset of at most `max_images` of)
    `images`, plus the features of the first `pr_rows` images of that subset for precision/recall."""
    n_all = len(images)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_all, generator=gen)[: max_images or n_all]
    n, d = len(order), extractor.num_features
    if n < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {n}")
    s1, s2, rows = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), []
    t0 = last = time.time()
    for i in range(0, n, batch_size):
        f = extractor(images[order[i:i + batch_size]].to(device)).double().cpu()
        s1 += f.sum(0)
        s2 += f.t() @ f
        if sum(len(r) for r in rows) < pr_rows:
            rows.append(f[: pr_rows - sum(len(r) for r in rows)].float())
        done = min(i + batch_size, n)
        if time.time() - last > 30 or done == n:
            last = time.time()
            log.info("ref stats %s: %d / %d images (%.1f images/s)", extractor.name, done, n, done / (last - t0))
    mu = s1 / n
    cov = (s2 - n * torch.outer(mu, mu)) / (n - 1)
    meta = dict(meta or {}, feature=extractor.name, feature_ident=extractor.ident, seed=seed,
                seconds=round(time.time() - t0, 1))
    return RefStats(mu.numpy(), cov.numpy(), n, torch.cat(rows).numpy(), meta)


def check_ref_meta(ref: RefStats, path, dataset: str, split: str, cap) -> None:
    """The statistics in `path` describe `split` of `dataset` (cap images of it, or all); ValueError otherwise."""
    meta = ref.meta
    want = {"dataset": dataset, "split": split}
    for key, value in want.items():
        if meta.get(key) != value:
            raise ValueError(f"reference statistics {path} are of {key} {meta.get(key)!r}, this run needs {value!r}: "
                             f"delete the file to recompute it (task=ref_stats)")
    n_avail = meta.get("n_available")
    expect = min(int(cap), int(n_avail)) if (cap and n_avail) else n_avail
    if expect is not None and int(ref.n) != int(expect):
        raise ValueError(f"reference statistics {path} hold {ref.n} images, ref_max_images={cap} of "
                         f"{n_avail} means {expect}: delete the file to recompute it (task=ref_stats)")


def ensure_ref_stats(cfg_metrics, cfg_dataset, extractor, device="cpu", force: bool = False) -> RefStats:
    """Load the cached reference statistics, or compute (needs the dataset) and cache them.

    A cache made with another feature network (different weights digest) is recomputed. A file whose
    stored dataset, split or image count is not the one its name promises (a renamed file) is refused."""
    path = ref_stats_path(cfg_metrics, cfg_dataset, extractor.name)
    if path.exists() and not force:
        ref = RefStats.load(path)
        check_ref_meta(ref, path, str(cfg_dataset.name), cfg_metrics.ref_split, cfg_metrics.ref_max_images)
        if ref.meta.get("feature_ident") == extractor.ident:
            return ref
        log.warning("%s was made with another %s network (%s != %s): recomputing", path, extractor.name,
                    ref.meta.get("feature_ident"), extractor.ident)
    from fewstep.data import load_dataset

    split = cfg_metrics.ref_split
    log.info("computing reference statistics %s (dataset %s, split %s)", path.name, cfg_dataset.name, split)
    images = load_dataset(cfg_dataset, split)
    if images.ndim != 4:
        raise ValueError(f"FID needs an image dataset, {cfg_dataset.name} has samples of shape {tuple(images.shape[1:])}")
    ref = compute_ref_stats(extractor, images, cfg_metrics.ref_max_images, int(cfg_metrics.pr_rows),
                            int(cfg_metrics.feature_batch), int(cfg_metrics.seed), device,
                            meta=dict(dataset=str(cfg_dataset.name), split=split, n_available=len(images)))
    ref.save(path, cfg_metrics.pr_dtype)
    log.info("saved %s (%d images, %d PR rows)", path, ref.n, len(ref.pr_features))
    return ref
