"""task=ref_stats: compute and cache the reference statistics of the real data for FID / precision-recall.

    python run.py task=ref_stats dataset=fashion_mnist metrics=inception

Uses the options of the selected metrics config (feature, ref_split, ref_max_images,
pr_rows, ref_stats_dir, ...) and writes <ref_stats_dir>/<dataset>-<split>-<feature>-<cap|all>.npz.
Evaluation does this on its own on first use; this task does it ahead of time (e.g.
before a sweep, or in the background) and with task.force=true rebuilds a cache.
"""
from __future__ import annotations

import time

from fewstep.config import user_errors
from fewstep.metrics import _device, build_feature, check_metrics_cfg, ensure_ref_stats, ref_stats_path


def run(cfg) -> dict:
    check_metrics_cfg(cfg.metrics)
    device = _device(cfg.device)
    t0 = time.time()
    extractor = build_feature(cfg.metrics, device)
    path = ref_stats_path(cfg.metrics, cfg.dataset, extractor.name)
    with user_errors():   # an unreadable or non-finite cached file: one line (task.force=true rebuilds it)
        ref = ensure_ref_stats(cfg.metrics, cfg.dataset, extractor, device, force=bool(cfg.task.force))
    return dict(path=str(path), feature=extractor.name, n_images=ref.n, pr_rows=len(ref.pr_features),
                dim=len(ref.mu), seconds=round(time.time() - t0, 1), size_bytes=path.stat().st_size)
