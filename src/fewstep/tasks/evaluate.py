"""task=evaluate: sample n_samples, measure quality and cost, write grid + metrics.json, log to W&B.

Sample i always starts from (and draws its ancestral noise from) the generator seeded from (seed, i), so
the numbers do not depend on batch_size. Wall time covers sampling only (not the metrics); NFE is counted
by the denoiser; MACs per sample = sum over call kinds of calls x MACs of that kind (FlopCounterMode).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..build import build_denoiser, resolve_device, sample_shape
from ..outputs import METRICS_FILE, RunLogger, output_dir, save_grid, save_points_plot, to_uint8, write_json_atomic
from ..samplers import sample
from ..samplers.noise import SampleNoise


def build_variance_rule(cfg, model):
    if cfg.variance.name == "fixed":
        return None
    from ..strategies.variance import build_variance, model_id

    return build_variance(cfg.variance, cfg.sampler, model.schedule, model_id(model.backbone))


def build_metrics(cfg, device):
    name = cfg.metrics.name
    if name == "gmm":
        return None
    if cfg.metrics.get("fid", False):
        from ..metrics import Metrics

        return Metrics(cfg.metrics, cfg.dataset, device)
    return None


def batches(n: int, bs: int, rank: int = 0, world: int = 1):
    """Index ranges of this rank: sample indices are global, so any split gives the same samples."""
    idx = np.arange(rank, n, world)
    for lo in range(0, len(idx), bs):
        yield idx[lo: lo + bs]


def cost_per_call(cfg, model, shape, device):
    """MACs per sample of each kind of backbone call (full / partial)."""
    try:
        from ..metrics.cost import macs_per_call
    except ImportError:
        return {}
    x = torch.zeros((1,) + tuple(shape), device=device)
    return macs_per_call(model.backbone, x, cache=model.cache)


@torch.no_grad()
def generate(cfg, model, variance, shape, device, indices, on_batch=None):
    """Sample the given global indices in batches; returns (samples on cpu, stats)."""
    out, nfe, calls_total, t_sample = [], [], {}, 0.0
    bs = int(cfg.batch_size)
    for lo in range(0, len(indices), bs):
        idx = indices[lo: lo + bs]
        noise = SampleNoise(int(cfg.seed), idx, shape, device=device)
        z = noise()
        model.reset()
        if model.cache is not None and hasattr(model.cache, "plan"):
            model.cache.plan(expected_nfe(cfg.sampler))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = sample(cfg.sampler, model, z, noise, model.schedule, variance=variance)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_sample += time.perf_counter() - t0
        nfe.append(model.nfe)
        for k, v in model.calls.items():
            calls_total[k] = calls_total.get(k, 0) + v * len(idx)
        x = x.float().cpu()
        if on_batch is not None:
            on_batch(x)
        out.append(x)
    samples = torch.cat(out) if out else torch.empty((0,) + tuple(shape))
    return samples, {"nfe": float(np.mean(nfe)) if nfe else 0.0, "calls": calls_total, "time": t_sample}


def expected_nfe(cfg_sampler) -> int:
    steps = int(cfg_sampler.steps)
    return 2 * steps - 1 if cfg_sampler.name == "heun" else steps


def print_table(metrics: dict, keys=None):
    keys = keys or [k for k, v in metrics.items() if isinstance(v, (int, float))]
    width = max(len(k) for k in keys)
    print("-" * (width + 16))
    for k in keys:
        v = metrics[k]
        print(f"{k:<{width}}  {v:>12.4g}" if isinstance(v, float) else f"{k:<{width}}  {v:>12}")
    print("-" * (width + 16))


def run(cfg) -> dict:
    out = output_dir()
    mfile = out / METRICS_FILE
    if cfg.get("resume", False) and mfile.exists():
        print(f"[fewstep] resume: {mfile} exists, nothing to do")
        return json.loads(mfile.read_text())
    device = resolve_device(cfg.get("device", "auto"))
    shape = sample_shape(cfg)
    model = build_denoiser(cfg, device)
    variance = build_variance_rule(cfg, model)
    metrics = build_metrics(cfg, device)
    logger = RunLogger(cfg)
    try:
        indices = np.arange(int(cfg.n_samples))
        samples, st = generate(cfg, model, variance, shape, device, indices,
                               on_batch=(lambda x: metrics.update(x)) if metrics is not None else None)
        n = len(samples)
        macs = cost_per_call(cfg, model, shape, device)
        result = {"n_samples": n, "nfe": st["nfe"], "wall_time_s": st["time"], "images_per_s": n / max(st["time"], 1e-9),
                  "sampler": cfg.sampler.name, "steps": int(cfg.sampler.steps), "skip": cfg.skip.name,
                  "cache": cfg.cache.name, "variance": cfg.variance.name, "device": str(device)}
        if macs:
            result["macs_per_sample"] = sum(c * macs.get(k, float("nan")) for k, c in st["calls"].items()) / n
            for k, v in macs.items():
                result[f"macs_{k.replace('@', '_')}"] = v
        for k, c in st["calls"].items():
            result[f"calls_{k.replace('@', '_')}"] = c / n
        if metrics is not None:
            result.update(metrics.compute())
        if cfg.metrics.name == "nll":
            from ..metrics.nll import evaluate_nll

            result.update(evaluate_nll(cfg, model, variance))
        images = {}
        if cfg.dataset.name == "gmm":
            from ..data import build_mixture
            from ..metrics.gmm_stats import gmm_metrics

            mixture = build_mixture(cfg.dataset)
            result.update(gmm_metrics(samples, mixture))
            if samples.shape[1] == 2:
                images["samples"] = save_points_plot(samples, out / "samples.png", reference=mixture.sample(2000))
        else:
            images["samples"] = save_grid(samples[: int(cfg.task.get("grid_size", 64))], out / "samples.png")
            if cfg.get("save_samples", False):
                np.savez_compressed(out / "samples.npz", images=to_uint8(samples).numpy())
        write_json_atomic(mfile, result)   # last: its presence means the run finished
        logger.log(result, images)
    finally:
        logger.finish()
    print_table(result, [k for k in ("nfe", "macs_per_sample", "wall_time_s", "images_per_s", "fid", "precision",
                                     "recall", "inception_score", "nll_bpd", "nll_bpd_se", "mean_err", "cov_err", "data_loglik") if k in result])
    print(f"[fewstep] results in {out}")
    return result
