"""task=denoise_loss: the denoising loss of one network call, in pixels and in features, with and without a
skip strategy: the mechanism Skip-Tuning (Ma et al., ICML 2024) proposes for its gain.

The paper's reading: scaling the skips down (rho < 1) makes each network call a worse denoiser in pixel
space (a higher denoising score-matching loss) but a better one in the feature space of an image
network, mostly at intermediate noise levels, and the feature space is what FID measures. This task
measures both on real images. For image x0 (a seeded subset of task.split), timestep t and noise eps
(per image and t, from the generator of (task.seed, image index, t): the same in every run), with
x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps and the prediction x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t):

    pixel_eps   = ||eps_hat - eps||^2 / d           the training loss (DDPM's L_simple)
    pixel_x0    = ||x0_hat - x0||^2 / d             = (1 - ab_t) / ab_t * pixel_eps
    feature     = ||f(x0_hat) - f(x0)||^2 / D       f = the FID feature network (metrics.feature:
                                                    the project's classifier, or Inception), on x0_hat
                                                    clipped to [-1, 1] and quantized as samples are

each for the plain network and for the configured skip strategy (skip=linear rho_*, freeu, learned,
residual), on the same (x0, eps): their difference per image gives a paired standard error. A
class-conditional network is given each image's own label. Writes into the run folder

    denoise_loss.csv   variant, t, ab, pixel_eps, pixel_x0, feature (means over images) and their
                       standard errors; for the strategy also d_* = strategy - plain and d_*_se (paired)
    denoise_loss.png   relative change (strategy / plain - 1) of the pixel and feature losses against t
    metrics.json       the timesteps (loss_t), the per-t rows under rows/<variant>/t<t>, and the relative
                       changes averaged over the t of three noise bands (low t < N/4, mid N/4 <= t < 3N/4,
                       high t >= 3N/4; and all), each with its paired standard error (band_summary)

    python run.py task=denoise_loss skip.rho_bottom=0.7
    python run.py -m task=denoise_loss skip.rho_bottom=0.5,0.7,0.9 task.n_images=2000
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import ConfigError, check
from ..fileio import atomic_path

log = logging.getLogger(__name__)

LOSSES = ("pixel_eps", "pixel_x0", "feature")
RELATIVE = ("pixel_eps", "feature")   # pixel_x0's relative change is pixel_eps's: the same factor per t
BANDS = (("low", 0.0, 0.25), ("mid", 0.25, 0.75), ("high", 0.75, 1.0))


def validate_task_cfg(cfg) -> List[int]:
    """The task's own options, before anything is built; returns the timesteps. One-line ConfigError."""
    task = cfg.task
    n = task.n_images
    check(isinstance(n, int) and not isinstance(n, bool) and n >= 2,
          f"task.n_images must be an integer >= 2 (got {n!r})")
    bs = task.batch_size
    check(isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1,
          f"task.batch_size must be an integer >= 1 (got {bs!r})")
    check(task.split in ("train", "test"), f"task.split must be train or test (got {task.split!r})")
    n_train = int(cfg.backbone.schedule.n)
    ts = list(task.timesteps)
    check(len(ts) >= 1 and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_train for t in ts),
          f"task.timesteps must be a list of integer timesteps in 0..{n_train - 1} (got {ts})")
    check(len(set(ts)) == len(ts), f"task.timesteps repeats a timestep (got {ts})")
    check(cfg.cache.name == "none", f"task=denoise_loss measures single network calls; cache={cfg.cache.name} "
                                    f"reuses features across calls: use cache=none")
    check(cfg.guidance.name == "none", "task=denoise_loss measures the network itself: use guidance=none")
    check(cfg.dataset.name != "gmm", "task=denoise_loss compares images in a feature space; dataset=gmm has none")
    check(bool(cfg.metrics.fid), f"task=denoise_loss needs a feature network: metrics={cfg.metrics.name} has none "
                                 f"(use metrics=default or metrics=inception)")
    return sorted(int(t) for t in ts)


def mean_se(v: np.ndarray):
    """The mean of per-image values and its standard error over images."""
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


def paired_rows(per_image: Dict[str, Dict[int, Dict[str, np.ndarray]]], ab: Dict[int, float]) -> List[dict]:
    """The csv rows from per-image losses per_image[variant][t][loss] (arrays over the same images):
    means and standard errors, and for variants other than "plain" the paired difference to it."""
    rows = []
    for variant, by_t in per_image.items():
        for t, losses in sorted(by_t.items()):
            row = {"variant": variant, "t": t, "ab": ab[t]}
            for k in LOSSES:
                v = losses[k]
                row[k], row[f"{k}_se"] = mean_se(v)
                if variant != "plain":
                    row[f"d_{k}"], row[f"d_{k}_se"] = mean_se(v - per_image["plain"][t][k])
            rows.append(row)
    return rows


def band_summary(rows: List[dict], arrays, n_train: int) -> Dict[str, float]:
    """Relative change strategy / plain - 1 of each loss: per t (added to the strategy's rows as rel_*), and
    averaged over the t of each noise band (and all t) as rel_<loss>/<band> with its standard error
    rel_<loss>/<band>_se over images: image i's band value is mean_t (loss_i,t - plain_i,t) / mean_j plain_j,t,
    so the paired per-image differences carry the error (the plain means, over all images, are taken as exact)."""
    plain = {r["t"]: r for r in rows if r["variant"] == "plain"}
    for r in rows:
        if r["variant"] != "plain":
            r.update({f"rel_{k}": r[f"d_{k}"] / plain[r["t"]][k] for k in RELATIVE})
    out = {}
    for variant, by_t in arrays.items():
        if variant == "plain":
            continue
        for name, lo, hi in BANDS + (("all", 0.0, 1.0),):
            ts = [t for t in by_t if lo * n_train <= t < hi * n_train or (hi == 1.0 and t >= lo * n_train)]
            if not ts:
                continue
            for k in RELATIVE:
                z = np.mean([(by_t[t][k] - arrays["plain"][t][k]) / plain[t][k] for t in ts], axis=0)
                out[f"rel_{k}/{name}"], out[f"rel_{k}/{name}_se"] = mean_se(z)
    return out


def _plot(rows: List[dict], path, label: str):
    from matplotlib.figure import Figure

    others = [r for r in rows if r["variant"] != "plain"]
    fig = Figure(figsize=(5.5, 3.6), tight_layout=True)
    ax = fig.subplots()
    ts = [r["t"] for r in others]
    plain = {r["t"]: r for r in rows if r["variant"] == "plain"}
    for k, style in (("pixel_eps", "o-"), ("feature", "s-")):
        rel = [r[f"d_{k}"] / plain[r["t"]][k] for r in others]
        err = [r[f"d_{k}_se"] / plain[r["t"]][k] for r in others]
        ax.errorbar(ts, rel, yerr=err, fmt=style, ms=3, capsize=2, label=k.replace("_", " "))
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("timestep t")
    ax.set_ylabel(f"{label} / plain - 1")
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def run(cfg, out_dir: Optional[str] = None) -> dict:
    """Measure the losses (see the module docstring) in the run folder, locked and resumed as evaluate's."""
    from ..run_folder import claim_run_folder, output_dir

    timesteps = validate_task_cfg(cfg)
    out = Path(out_dir) if out_dir is not None else output_dir()
    with claim_run_folder(cfg, out) as claim:
        return claim.done if claim.done is not None else _measure(cfg, out, claim.hashed, timesteps)


def _measure(cfg, out: Path, hashed, timesteps: List[int]) -> dict:
    from ..build import build_denoiser, resolve_device
    from ..data.datasets import load_dataset
    from ..loggers import RunLogger
    from ..metrics.features import build_feature
    from ..run_folder import write_result
    from ..samplers.noise import SampleNoise

    device = resolve_device(cfg.device)
    task = cfg.task
    x_all, y_all = load_dataset(cfg.dataset, split=task.split, with_labels=True)
    n = int(task.n_images)
    if n > len(x_all):
        raise ConfigError(f"task.n_images={n} is more than the {len(x_all)} images of the {task.split} split")
    idx = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(int(task.seed)))[:n].sort().values
    model = build_denoiser(cfg, device)
    feature = build_feature(cfg.metrics, device)
    residual = cfg.skip.name == "residual"
    hooks = "residual_hooks" if residual else "skip_hooks"
    adapter = model.backbone
    strategy = list(getattr(adapter, hooks, None) or [])
    variants = {"plain": []}
    if strategy:
        variants[str(cfg.skip.name)] = strategy
    schedule = model.schedule
    ab = {t: float(schedule.alpha_bar_at(t)) for t in timesteps}
    per_image: Dict[str, Dict[int, Dict[str, list]]] = {v: {t: {k: [] for k in LOSSES} for t in timesteps}
                                                        for v in variants}
    bs = int(task.batch_size)
    saved = getattr(adapter, hooks, None)
    try:
        with torch.no_grad():
            for start in range(0, n, bs):
                rows = idx[start:start + bs]
                x0 = x_all[rows].to(device)
                extra = {} if model.null_label is None else {"class_labels": y_all[rows].to(device)}
                f0 = feature.extract(x0)[0]
                for t in timesteps:    # eps of image i at t: its own stream (seed, i, t), whatever else is measured
                    eps = SampleNoise(int(task.seed), rows.tolist(), tuple(x0.shape[1:]), device=device,
                                      stream=1 + t)()
                    xt = math.sqrt(ab[t]) * x0 + math.sqrt(1.0 - ab[t]) * eps
                    for v, hook_list in variants.items():
                        setattr(adapter, hooks, list(hook_list))
                        eps_hat = model(xt, float(t), **extra).float()
                        x0_hat = schedule.x0_from_eps(xt, float(t), eps_hat)
                        acc = per_image[v][t]
                        pix = (eps_hat - eps).flatten(1).pow(2).mean(1)
                        acc["pixel_eps"].append(pix.cpu())
                        acc["pixel_x0"].append((x0_hat - x0).flatten(1).pow(2).mean(1).cpu())
                        f = feature.extract(x0_hat.clamp(-1.0, 1.0))[0]
                        acc["feature"].append((f - f0).pow(2).mean(1).cpu())
    finally:
        setattr(adapter, hooks, saved)
    arrays = {v: {t: {k: torch.cat(vals).double().numpy() for k, vals in by_k.items()} for t, by_k in by_t.items()}
              for v, by_t in per_image.items()}
    rows = paired_rows(arrays, ab)
    result = band_summary(rows, arrays, schedule.N) if len(variants) > 1 else {}
    csv_path = out / "denoise_loss.csv"
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    files = {}
    if len(variants) > 1:
        _plot(rows, out / "denoise_loss.png", str(cfg.skip.name))
        files["denoise_loss"] = out / "denoise_loss.png"
    result.update({"n_images": n, "split": str(task.split), "loss_t": timesteps, "skip": str(cfg.skip.name),
                   "feature": str(cfg.metrics.feature), "variants": list(variants),
                   "rows": {f"{r['variant']}/t{r['t']}": {k: v for k, v in r.items() if k not in ("variant", "t")}
                            for r in rows}})
    for key in ("rho_top", "rho_bottom"):
        if key in cfg.skip:
            result[key] = float(cfg.skip[key])
    result = write_result(out, hashed, result)    # before the logger: its presence means the run finished
    logger = RunLogger(cfg)
    try:
        logger.log({k: v for k, v in result.items() if isinstance(v, (int, float))}, files)
    finally:
        logger.finish()
    log.info("denoising losses of %d variant(s) at %d timesteps written to %s", len(variants), len(timesteps), csv_path)
    return result
