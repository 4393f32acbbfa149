"""task=gamma: Monte Carlo estimate of Analytic-DPM's Gamma_t = E ||eps_theta(x_t, t)||^2 / d for a model.

    python run.py task=gamma dataset=fashion_mnist backbone.pretrained=checkpoints/fashion_mnist/unet
    python run.py task=gamma experiment=gmm_demo task.M=2000
    python run.py task=gamma trainer=ddp task.M=50000        # several devices (see below)

Then sample or bound the likelihood with `variance=analytic` (and `sampler.timesteps=analytic_dp`).

What it does: takes a seeded random subset of M points of `task.split` of the dataset, and for every
timestep in `task.timesteps` (default all N) draws one x_t per point, x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps,
and averages ||eps_theta(x_t, t)||^2 / d (`fewstep.strategies.variance.estimate_gamma`, batched, N model
calls per batch). The result, with its per-timestep standard error, goes to
`<out_dir>/gamma_<model_id>_<dataset>_M<M>.safetensors` (tensors + JSON metadata, see
`fewstep.strategies.variance.save_gamma`); `model_id` is a content hash of the network's weights, so
`variance=analytic` finds the file of exactly this model and refuses a Gamma of another one. out_dir
defaults to the pretrained folder when it is a local, writable folder, else to task.cache_dir.

Cost: N x M / batch_size batched calls (N = 1000, M = 1000: 1M images through the network). The official
Analytic-DPM runs use the whole training set (M = 50k for CIFAR-10); a few thousand points already give a
standard error far below the differences that matter for the variance (it is printed).

Resumable: every `task.save_every` batches each process writes its running sums and noise-generator state
to `<file>.partial<rank>of<world>` (safetensors: sums and generator state as tensors, the settings key as
JSON metadata); rerunning the same command continues where it stopped and gives exactly the numbers of an
uninterrupted run. A finished file is reused unless task.overwrite=true. Files of the earlier pickle format
(.pt) are never read: a partial at the looked-up path that is not a safetensors partial is a one-line error.

Several devices: with a multi-device trainer (trainer.devices > 1, num_nodes > 1 or a ddp strategy) the task
launches its processes with Lightning Fabric (a torchrun-style launch that already initialised
torch.distributed is used as is). Each rank takes the points rank, rank + world, ...; noise comes from a
generator seeded from (seed, rank); the per-timestep sums are all-reduced and rank 0 writes the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ConfigError
from ..safe_io import jsonable, load_tensors, save_tensors
from ..strategies.variance import (GammaStats, check_timesteps, estimate_gamma, gamma_filename, load_gamma, model_id,
                                   save_gamma, schedule_id)


PARTIAL_KIND = "gamma-partial"


def default_out_dir(cfg) -> Path:
    """The pretrained folder if it is a local writable folder, else task.cache_dir."""
    pre = cfg.backbone.get("pretrained", None) if "backbone" in cfg else None
    if pre:
        p = Path(os.path.expanduser(str(pre)))
        if p.is_dir() and os.access(p, os.W_OK):
            return p
    return Path(os.path.expanduser(str(cfg.task.get("cache_dir") or "checkpoints/gamma")))


def setup_distributed(cfg):
    """(rank, world_size, device or None). Launches Fabric processes for a multi-device trainer config."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        return dist.get_rank(), dist.get_world_size(), dev
    tr = cfg.get("trainer", None)
    if tr is None:
        return 0, 1, None
    from omegaconf import OmegaConf

    devices = tr.get("devices", 1)
    devices = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
    nodes = int(tr.get("num_nodes", 1))
    strategy = str(tr.get("strategy", "auto"))
    multi = (nodes > 1 or strategy.startswith("ddp") or (isinstance(devices, int) and (devices > 1 or devices == -1))
             or (isinstance(devices, (list, tuple)) and len(devices) > 1))
    if not multi:
        return 0, 1, None
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=tr.get("accelerator", "auto"), devices=devices, num_nodes=nodes, strategy=strategy)
    fabric.launch()
    return fabric.global_rank, fabric.world_size, fabric.device


def _rank_seed(seed: int, rank: int) -> int:
    from ..samplers.noise import sample_seed

    return sample_seed(seed, rank)


def estimate_to_file(model, data: torch.Tensor, schedule, path, *, mid: str, dataset: str, timesteps=None,
                     batch_size: int = 256, seed: int = 0, rank: int = 0, world: int = 1, save_every: int = 1,
                     max_batches: Optional[int] = None, progress: bool = True, pretrained=None, device=None,
                     extra: Optional[dict] = None) -> Optional[dict]:
    """Estimate Gamma over `data` (all M points, same order on every rank) and write the Gamma file at `path`.

    This rank handles data[rank::world]; partial results go to `<path>.partial<rank>of<world>` every
    `save_every` batches and are picked up by the next call. `max_batches` stops after that many batches
    of this call and returns None (an interruption, for tests); otherwise returns the loaded Gamma file.
    """
    import torch.distributed as dist

    path = Path(path)
    M = len(data)
    ts = check_timesteps(timesteps, schedule.N)
    shard = data[rank::world]
    partial = path.with_name(f"{path.name}.partial{rank}of{world}")
    key = {"model_id": mid, "dataset": dataset, "M": M, "world": world, "seed": int(seed),
           "schedule_id": schedule_id(schedule), "timesteps": ts.tolist()}
    generator = torch.Generator().manual_seed(_rank_seed(seed, rank))
    stats = GammaStats(ts)
    if partial.exists():
        st, meta = load_tensors(partial, PARTIAL_KIND, "delete it and rerun (the estimate starts over)")
        if meta.get("key") == jsonable(key):
            stats = GammaStats(st["timesteps"].numpy(), st["sum"].numpy(), st["sumsq"].numpy(), int(meta["count"]))
            generator.set_state(st["generator"])
            if progress:
                print(f"[fewstep] gamma: resuming from {partial} ({stats.count}/{len(shard)} points of rank {rank})")
        elif progress:
            print(f"[fewstep] gamma: ignoring {partial} (made with other settings)")
    legacy = path.with_name(f"{path.stem}.pt.partial{rank}of{world}")
    if legacy != partial and legacy.exists() and progress:
        print(f"[fewstep] gamma: not reading {legacy} (the earlier pickle format, which can run code); "
              f"the estimate starts over, delete that file")

    def save_partial(s: GammaStats):
        save_tensors(partial, {"timesteps": torch.as_tensor(s.timesteps), "sum": torch.as_tensor(s.sum),
                               "sumsq": torch.as_tensor(s.sumsq), "generator": generator.get_state()},
                     PARTIAL_KIND, {"key": key, "count": int(s.count)})

    done = stats.count
    todo = shard[done:]
    starts = list(range(0, len(todo), batch_size))
    stopped = max_batches is not None and max_batches < len(starts)
    starts = starts[:max_batches] if max_batches is not None else starts
    dev = device if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = (todo[i: i + batch_size].to(dev) for i in starts)
    counter = {"n": 0}

    def checkpoint(s: GammaStats):
        counter["n"] += 1
        if counter["n"] % max(int(save_every), 1) == 0:
            save_partial(s)

    path.parent.mkdir(parents=True, exist_ok=True)
    stats = estimate_gamma(model, batches, schedule, generator=generator, stats=stats, callback=checkpoint,
                           progress=progress and rank == 0, total=len(starts))
    save_partial(stats)
    if stopped:
        return None
    distributed = dist.is_available() and dist.is_initialized()
    red_dev = device if device is not None and torch.device(device).type == "cuda" else None
    stats = stats.all_reduce(red_dev)
    if stats.count != M:
        raise RuntimeError(f"Gamma estimate covers {stats.count} points, expected M = {M}")
    if rank == 0:
        save_gamma(path, stats, model_id=mid, dataset=dataset, schedule=schedule, pretrained=pretrained,
                   world_size=world, seed=int(seed), **(extra or {}))
    if distributed:
        dist.barrier()
    partial.unlink(missing_ok=True)
    return load_gamma(path, mid, schedule)


def summary(g: dict) -> dict:
    gamma, se = g["gamma"].numpy(), g["stderr"].numpy()
    above = np.nonzero(gamma > 1.0)[0]
    return {"gamma_path": g["path"], "model_id": g["model_id"], "M": int(g["M"]), "n_timesteps": int(len(gamma)),
            "gamma_min": float(gamma.min()), "gamma_max": float(gamma.max()), "gamma_mean": float(gamma.mean()),
            "stderr_max": float(se.max()),
            "first_t_gamma_above_1": int(g["timesteps"][above[0]]) if len(above) else -1}


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1 (got {value!r})")
    return int(value)


def _strategies_active(cfg) -> bool:
    skip = cfg.get("skip", None) or {}
    rho_on = any(float(skip.get(k, 1.0)) != 1.0 for k in ("rho_top", "rho_bottom"))
    return skip.get("name", "none") not in ("none", "linear") or rho_on


def run(cfg) -> dict:
    from ..build import build_denoiser, build_schedule, resolve_device
    from ..data import load_dataset

    tc = cfg.task
    M = _positive_int(tc.get("M"), "task.M")
    bs = _positive_int(tc.get("batch_size", None) or cfg.get("batch_size"), "task.batch_size")
    save_every = _positive_int(tc.get("save_every", 1), "task.save_every")
    schedule = build_schedule(cfg.backbone.schedule)
    ts = tc.get("timesteps", "all")
    try:
        ts = check_timesteps(list(ts) if not isinstance(ts, (str, int)) and ts is not None else ts, schedule.N)
    except ValueError as e:
        raise ConfigError(f"task.{e}") from None
    split = tc.get("split", "train")
    dataset = cfg.dataset.name
    seed = int(cfg.get("seed", 0))

    rank, world, fdevice = setup_distributed(cfg)
    data = load_dataset(cfg.dataset, split)
    data = data[0] if isinstance(data, (tuple, list)) else data
    if M > len(data):
        raise ConfigError(f"task.M={M} exceeds the {len(data)} points of {dataset} ({split}); use task.M <= {len(data)}")
    data = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:M]]
    device = fdevice if fdevice is not None else resolve_device(cfg.get("device", "auto"))
    model = build_denoiser(cfg, device)
    model.eval()
    model.cache = None  # Gamma is a property of the network: no cached partial forwards across timesteps
    mid = model_id(model.backbone)
    out = Path(os.path.expanduser(str(tc.get("out_dir") or default_out_dir(cfg))))
    path = out / gamma_filename(mid, dataset, M)
    if path.exists() and not tc.get("overwrite", False):
        g = load_gamma(path, mid, schedule)
        if rank == 0:
            print(f"[fewstep] gamma: {path} exists (task.overwrite=true to re-estimate)")
        return summary(g)
    if rank == 0 and _strategies_active(cfg):
        print("[fewstep] gamma: note: skip scaling is active and goes into this Gamma (the cache is not used); "
              "the file is keyed by the network weights only")
    pre = cfg.backbone.get("pretrained", None)
    g = estimate_to_file(model, data, schedule, path, mid=mid, dataset=dataset, timesteps=ts, batch_size=bs,
                         seed=seed, rank=rank, world=world, save_every=save_every, progress=True, pretrained=pre,
                         device=device, extra={"split": split, "backbone": cfg.backbone.name,
                                               "skip": str(cfg.get("skip", {}).get("name")),
                                               "skip_active": _strategies_active(cfg)})
    result = summary(g)
    if rank == 0:
        print(f"[fewstep] gamma: wrote {path}  (Gamma in [{result['gamma_min']:.4f}, {result['gamma_max']:.4f}], "
              f"max stderr {result['stderr_max']:.2e})")
    return result
