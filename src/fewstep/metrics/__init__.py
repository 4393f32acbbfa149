"""Sample-quality and cost metrics.

One entry point for evaluation:

    metrics = Metrics(cfg.metrics, cfg.dataset, device)
    for batch in batches: metrics.update(batch)      # float images in [-1, 1], N x C x H x W
    metrics.compute()   # {"feature", "fid", "precision", "recall", "inception_score", ...}

One feature pass per batch feeds FID (torchmetrics FrechetInceptionDistance with a
pluggable feature module, fewstep.metrics.fid.FID), improved precision/recall
(k-NN manifolds, fewstep.metrics.precision_recall) and, when the feature network has
logits, the Inception Score. The real side comes from cached reference statistics
(fewstep.metrics.fid.ensure_ref_stats; computed and cached on first use, which needs
the dataset). All accumulators are torchmetrics states, so they sync across DDP ranks
in compute(). Cost (NFE, MACs) lives in fewstep.metrics.cost.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .classifier import file_digest
from .cost import count_macs, macs_per_call
from .features import FEATURES, build_feature, inception_preprocess, quantize
from .fid import (FID, RefStats, bootstrap_fid_se, compute_ref_stats, ensure_ref_stats, frechet_distance, inception_score,
                  fid_contrast, fid_contrasts, paired_fid_difference, ref_stats_path)
from .precision_recall import precision_recall

log = logging.getLogger(__name__)

__all__ = ["Metrics", "FeatureBank", "FID", "RefStats", "bootstrap_fid_se", "build_feature", "compute_ref_stats", "count_macs",
           "ensure_ref_stats", "fid_contrast", "fid_contrasts", "frechet_distance", "inception_preprocess", "inception_score", "macs_per_call", "paired_fid_difference",
           "precision_recall", "quantize", "ref_stats_path", "check_metrics_cfg"]


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _device(device) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_metrics_cfg(cfg_metrics) -> None:
    """One ValueError line per bad option of a feature-metrics config (fid: true; every key of
    conf/metrics/default.yaml set), before any heavy work. The tasks call it once per run."""
    if cfg_metrics.feature not in FEATURES:
        raise ValueError(f"unknown metrics.feature '{cfg_metrics.feature}' (choose from {', '.join(FEATURES)})")
    for key, lo in (("pr_k", 1), ("pr_rows", 2), ("pr_max_fake", 2), ("is_splits", 1), ("feature_batch", 1),
                    ("fid_bootstrap", 0)):
        v = cfg_metrics[key]
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"metrics.{key} must be an integer >= {lo}, got {v}")
    cap = cfg_metrics.ref_max_images
    if cap is not None and (not isinstance(cap, int) or cap < 2):
        raise ValueError(f"metrics.ref_max_images must be null (all) or an integer >= 2, got {cap}")
    if cfg_metrics.pr_dtype not in ("float32", "float16"):
        raise ValueError(f"metrics.pr_dtype must be float32 or float16, got {cfg_metrics.pr_dtype}")
    if cfg_metrics.ref_split not in ("train", "test"):
        raise ValueError(f"metrics.ref_split must be train or test, got {cfg_metrics.ref_split}")


def paired_features_file(path) -> Path:
    """metrics.paired_with -> the features.npz it names (a run folder or the file itself)."""
    p = Path(str(path)).expanduser()
    return p / "features.npz" if p.is_dir() else p


def same_ref_stats(base_ref, ours: Path, ours_digest: str | None = None) -> bool:
    """Whether the reference statistics a base run was scored against (the path its features.npz records) are
    this run's: the same file, or a file of the same content (ours_digest: ours' file_digest, if known)."""
    if base_ref is None:
        return False
    base_ref = Path(str(base_ref))
    if base_ref.resolve() == Path(ours).resolve():
        return True
    if not base_ref.is_file() or (ours_digest is None and not Path(ours).is_file()):
        return False
    return file_digest(base_ref) == (ours_digest or file_digest(ours))


def check_paired_model(cfg_metrics, model_id: str) -> None:
    """metrics.paired_with once the network is built, before sampling: the base run (where its metrics.json
    names one) was made by this same network (fewstep.identity.model_id: its weights' content)."""
    import json

    from ..config import ConfigError

    m = paired_features_file(cfg_metrics.paired_with).parent / "metrics.json"
    base = json.loads(m.read_text()).get("model_id") if m.is_file() else None
    if base is not None and base != model_id:
        raise ConfigError(f"metrics.paired_with: the base run was made by model {base}, this run's network is "
                          f"{model_id}: paired runs compare one model's samples")


def check_paired_with(cfg_metrics, cfg_dataset, n_samples: int, seed: int) -> None:
    """metrics.paired_with before any work: the base run's feature file exists, holds one row per sample
    of this run, was scored against the reference statistics this run will use, and (where its config is
    beside it) was sampled with the same seed. One-line ValueError."""
    import numpy as np
    from omegaconf import OmegaConf

    f = paired_features_file(cfg_metrics.paired_with)
    if not f.is_file():
        raise ValueError(f"metrics.paired_with={cfg_metrics.paired_with}: no features.npz there (the base run needs "
                         f"save_features=true)")
    try:
        with np.load(f, allow_pickle=False) as z:
            rows = z["features"].shape[0]
            base_ref = str(z["ref_stats"]) if "ref_stats" in z else None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"metrics.paired_with: {f} is not a features.npz of task=evaluate ({type(e).__name__})") from None
    if rows != n_samples:
        raise ValueError(f"metrics.paired_with: {f} holds {rows} samples, this run makes {n_samples}: paired runs "
                         f"share their sample indices")
    ours = ref_stats_path(cfg_metrics, cfg_dataset, cfg_metrics.feature)
    if not same_ref_stats(base_ref, ours):
        raise ValueError(f"metrics.paired_with: the base run was scored against {base_ref}, this run will be against "
                         f"{ours}: paired FIDs need the same reference statistics")
    base_cfg = f.parent / ".hydra" / "config.yaml"
    if base_cfg.is_file():
        base_seed = OmegaConf.load(base_cfg).get("seed")
        if base_seed is not None and int(base_seed) != int(seed):
            raise ValueError(f"metrics.paired_with: the base run used seed={base_seed}, this run seed={seed}: "
                             f"paired runs share their noise")


def min_samples(cfg_metrics, has_logits: bool | None = None) -> int:
    """The fewest generated samples the metrics of cfg_metrics can be computed on: 2 for FID, k + 1 for
    precision/recall (a k-th neighbour), is_splits for the Inception Score (when the feature network has
    logits: the classifier has, the TF-Inception pool3 network has not; None = decide by metrics.feature)."""
    m = cfg_metrics
    if has_logits is None:
        has_logits = m.feature == "classifier"
    pr = int(m.pr_k) + 1 if bool(m.precision_recall) else 2
    is_ = int(m.is_splits) if (bool(m.inception_score) and has_logits) else 2
    return max(2, pr, is_)


class ClassConsistency(Metric):
    """Class consistency of conditional samples: how often the feature classifier assigns a sample the class
    it was generated for, overall and per class (a classifier with the dataset's classes: test accuracy
    on real images, classifier_test_accuracy, is the ceiling to compare with). Counts are summed across
    processes."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.add_state("correct", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if int(labels.max()) >= self.num_classes or int(labels.min()) < 0:
            raise ValueError(f"class labels outside the feature classifier's {self.num_classes} classes")
        hit = (logits.argmax(1) == labels).long()
        self.total += torch.bincount(labels, minlength=self.num_classes)
        self.correct += torch.bincount(labels, weights=hit.double(), minlength=self.num_classes).long()

    def compute(self) -> dict:
        out = {"class_accuracy": float(self.correct.sum()) / max(1, int(self.total.sum()))}
        for c in range(self.num_classes):
            if int(self.total[c]):
                out[f"class_accuracy_{c}"] = float(self.correct[c]) / int(self.total[c])
        return out


class FeatureBank(Metric):
    """Keeps up to `max_rows` fake feature rows (and logits) for precision/recall and IS; counts all samples.
    The row cap applies per process (each DDP rank keeps up to max_rows)."""

    full_state_update = False

    def __init__(self, max_rows: int = 10000, **kwargs):
        super().__init__(**kwargs)
        self.max_rows = int(max_rows)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("kept", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("seen", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, logits: Optional[torch.Tensor] = None) -> None:
        room = max(0, self.max_rows - int(self.kept))
        self.seen += len(features)
        if room:
            self.features.append(features[:room].float())
            if logits is not None:
                self.logits.append(logits[:room].float())
            self.kept += min(room, len(features))

    def compute(self):
        feats = dim_zero_cat(self.features) if len(self.features) else None  # a list, or a tensor after a cross-process sync
        logits = dim_zero_cat(self.logits) if len(self.logits) else None
        return int(self.seen), feats, logits


class Metrics:
    """FID, precision/recall and Inception Score of generated images against cached real statistics.

    cfg_metrics: conf/metrics/*.yaml (see default.yaml for every option); cfg_dataset: conf/dataset.
    keep_rows: keep the generated feature rows (up to pr_max_fake) even if no metric needs them, for
    `fake_features` (save_features=true). With `fid: false` it does nothing and compute() returns {}.
    The config is taken as validated (check_metrics_cfg, which the tasks run once before any work)."""

    def __init__(self, cfg_metrics, cfg_dataset, device="cpu", keep_rows: bool = False):
        self.cfg = cfg_metrics
        self.device = _device(device)
        self.enabled = bool(cfg_metrics.fid)
        if not self.enabled:
            return
        m = cfg_metrics
        self.k = int(m.pr_k)
        self.do_pr = bool(m.precision_recall)
        self.pr_equal_sizes = bool(m.pr_equal_sizes)
        self.is_splits = int(m.is_splits)
        self.extractor = build_feature(cfg_metrics, self.device)
        self.do_is = bool(m.inception_score) and self.extractor.has_logits
        self.ref = ensure_ref_stats(cfg_metrics, cfg_dataset, self.extractor, self.device)
        self.ref_path = ref_stats_path(cfg_metrics, cfg_dataset, self.extractor.name)
        self.ref_digest = file_digest(self.ref_path)   # which statistics made the FID: metrics.json records it
        self.fake_features = None       # after compute(): the generated rows kept (in sample order), N x D
        self.fid = FID(self.extractor).to(self.device)
        self.consistency = None      # made at the first labelled batch (conditional models)
        if _rank() == 0:  # states are summed across ranks in compute(): the reference counts once
            self.fid.load_reference(self.ref.mu, self.ref.cov, self.ref.n)
        self.n_boot = int(m.fid_bootstrap)
        self.seed = int(m.seed)
        self.paired_with = m.paired_with      # a base run's features.npz: the paired FID difference to it
        keep = int(m.pr_max_fake) if (self.do_pr or self.do_is or self.n_boot or keep_rows or self.paired_with) else 0
        self.bank = FeatureBank(keep).to(self.device)
        self.min_samples = min_samples(cfg_metrics, self.extractor.has_logits)

    @property
    def feature_name(self) -> str:
        return self.extractor.name if self.enabled else "none"

    @torch.no_grad()
    def update(self, fake: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Add a batch of generated images (float, [-1, 1] -- clipped --, N x C x H x W), with the class
        labels they were sampled for when the model is conditional (class consistency)."""
        if not self.enabled:
            return
        feats, logits = self.extractor.extract(fake.to(self.device))
        self.fid.update(features=feats, real=False)
        self.bank.update(feats, logits if self.do_is else None)
        if labels is not None and logits is not None:
            if self.consistency is None:
                self.consistency = ClassConsistency(logits.shape[1]).to(self.device)
            self.consistency.update(logits, labels.to(self.device))

    def _paired(self, feats, n_fake: int) -> dict:
        """fid_diff = FID - the base run's FID on the same sample indices, and its paired bootstrap s.e."""
        import numpy as np

        f = paired_features_file(self.paired_with)
        with np.load(f, allow_pickle=False) as z:
            base, base_ref = torch.from_numpy(z["features"].astype(np.float32)), str(z["ref_stats"])
        if not same_ref_stats(base_ref, self.ref_path, self.ref_digest):
            raise ValueError(f"metrics.paired_with: the base run was scored against {base_ref}, this run against "
                             f"{self.ref_path}: paired FIDs need the same reference statistics")
        if feats is None or len(feats) != n_fake:
            raise ValueError(f"metrics.paired_with needs every generated feature row: raise metrics.pr_max_fake to "
                             f">= {n_fake}")
        d, se = paired_fid_difference(feats.float().cpu(), base, self.ref.mu, self.ref.cov, self.n_boot or 200,
                                      self.seed)
        return {"fid_diff": d, "fid_diff_se": se, "paired_with": str(f.resolve())}

    def reset(self) -> None:
        """Forget the generated images (the real statistics stay)."""
        if self.enabled:
            self.fid.reset()
            self.bank.reset()
            if self.consistency is not None:
                self.consistency.reset()

    @torch.no_grad()
    def compute(self) -> dict:
        if not self.enabled:
            return {}
        n_fake, feats, logits = self.bank.compute()
        self.fake_features = feats
        if n_fake < self.min_samples:
            raise ValueError(f"metrics need at least {self.min_samples} generated samples "
                             f"(FID 2, precision/recall k+1={self.k + 1}, IS splits={self.is_splits}), got {n_fake}")
        out = {"feature": self.extractor.name, "fid": float(self.fid.compute()), "n_fake": n_fake, "n_ref": self.ref.n,
               "ref_stats": str(self.ref_path.resolve()), "ref_stats_sha256": self.ref_digest}
        if self.n_boot and feats is not None and len(feats) == n_fake:   # every row kept (pr_max_fake >= n_samples)
            out["fid_se"] = bootstrap_fid_se(feats, self.ref.mu, self.ref.cov, self.n_boot, self.seed)
        elif self.n_boot:
            log.warning("no fid_se: %d of %d generated feature rows kept (raise metrics.pr_max_fake)", len(feats), n_fake)
        if self.paired_with:
            out.update(self._paired(feats, n_fake))
        if self.do_pr:
            real = torch.from_numpy(self.ref.pr_features).to(self.device)
            m = min(len(real), len(feats)) if self.pr_equal_sizes else None
            out["precision"], out["recall"] = precision_recall(real[:m], feats[:m], self.k)
            out["pr_rows"] = len(real[:m])
        if self.do_is:
            out["inception_score"], out["inception_score_std"] = inception_score(logits, self.is_splits)
        acc = getattr(self.extractor, "test_accuracy", None)
        if acc is not None:
            out["classifier_test_accuracy"] = float(acc)
        if self.consistency is not None:
            out.update(self.consistency.compute())
        return out
