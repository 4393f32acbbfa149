"""task=gamma: Monte Carlo estimate of Analytic-DPM's Gamma_t = E ||eps_theta(x_t, t)||^2 / d for a model.

    python run.py task=gamma dataset=fashion_mnist backbone.pretrained=checkpoints/fashion_mnist/unet
    python run.py task=gamma experiment=gmm_demo task.M=2000
    python run.py task=gamma trainer=ddp trainer.devices=8 task.M=50000    # several processes (see below)

Then sample or bound the likelihood with `variance=analytic` (and `sampler.timesteps=analytic_dp`).

What it does: takes a seeded random subset of M points of `task.split` of the dataset, and for every
timestep in `task.timesteps` (default all N) draws one x_t per point, x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps,
and averages ||eps_theta(x_t, t)||^2 / d (`fewstep.strategies.variance.gamma.estimate_gamma`, batched, N model
calls per batch). The result, with its per-timestep standard error, goes to
`<out_dir>/gamma_<model_id>_<dataset>_M<M>.safetensors` (tensors + JSON metadata, see
`fewstep.strategies.variance.gamma.save_gamma`); `model_id` is a content hash of the network's weights, so
`variance=analytic` finds the file of exactly this model and refuses a Gamma of another one. out_dir
defaults to the pretrained folder when it is a local, writable folder, else to task.cache_dir.

The noise: one generator seeded from `seed` draws, batch after batch of task.batch_size points (in the
order of the subset) and timestep after timestep, eps for the whole batch. So the numbers depend on
(seed, M, batch_size, timesteps) and on nothing else: not on interruptions, nor on the number of processes.

Cost: N x M / batch_size batched calls (N = 1000, M = 1000: 1M images through the network). The official
Analytic-DPM runs use the whole training set (M = 50k for CIFAR-10); a few thousand points already give a
standard error far below the differences that matter for the variance (it is printed).

Resumable: every `task.save_every` batches each process writes its running sums and noise-generator state
to `<file>.partial<rank>of<world>` (safetensors: sums and generator state as tensors, the settings key as
JSON metadata); rerunning the same command continues where it stopped and gives exactly the numbers of an
uninterrupted run. A finished file is reused unless task.overwrite=true. Files of the earlier pickle format
(.pt) are never read: a partial at the looked-up path that is not a safetensors partial is a one-line error.

Several processes (a multi-device trainer: trainer.devices > 1, num_nodes > 1 or a ddp strategy, e.g.
`trainer=ddp_cpu trainer.devices=2` with gloo on CPU) go through `fewstep.parallel.run_parallel`, as
task=evaluate does (a cluster launch, or one that already initialised torch.distributed, is used as is):

* rank r takes the contiguous block `parallel.shard(n_batches, r, world)` of the global batches
  (n_batches = ceil(M / batch_size)), i.e. a contiguous block of points cut at batch boundaries, so every
  batch holds exactly the points it holds in one process;
* its generator is that of one process, advanced past the noise of the batches before its block (noise
  draws only, no network calls: CPU work that grows with the rank, at most that of one whole run), so every
  point gets the noise it gets in one process;
* the per-rank sums are gathered and added in rank order, and only global rank 0 writes the file.

So the Gamma file of W processes is that of one process up to the float64 summation order (and to any
batch-dependent round-off of the network on other devices); its metadata records world_size = W.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ConfigError
from ..parallel import SINGLE, Dist, all_gather, is_multiprocess, run_parallel, shard
from ..identity import model_id, schedule_id
from ..safe_io import jsonable, load_tensors, save_tensors
from ..strategies.variance.gamma import (GammaStats, check_timesteps, estimate_gamma, gamma_filename, load_gamma,
                                         save_gamma)


PARTIAL_KIND = "gamma-partial"


def default_out_dir(cfg) -> Path:
    """The pretrained folder if it is a local writable folder, else task.cache_dir."""
    pre = cfg.backbone.pretrained
    if pre:
        p = Path(os.path.expanduser(str(pre)))
        if p.is_dir() and os.access(p, os.W_OK):
            return p
    return Path(os.path.expanduser(str(cfg.task.cache_dir)))


def _noise_seed(seed: int) -> int:
    """The seed of the one noise stream of an estimate (that of the single-process runs so far)."""
    from ..samplers.noise import sample_seed

    return sample_seed(seed, 0)


def rank_batches(M: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """The global batches (of batch_size points, the last one possibly shorter) of this rank: a contiguous
    block, `parallel.shard` of the batch indices. Batch k holds the points k * batch_size ... of the subset."""
    n_batches = -(-int(M) // int(batch_size))
    b = shard(n_batches, rank, world)
    return range(int(b[0]), int(b[-1]) + 1) if len(b) else range(n_batches, n_batches)


def _skip_noise(generator: torch.Generator, n_batches: int, batch_size: int, point_shape, n_timesteps: int) -> None:
    """Advance generator past the noise estimate_gamma draws for n_batches full batches (one randn of the
    batch's shape per batch and timestep), exactly as drawing it would."""
    shape = (int(batch_size),) + tuple(point_shape)
    for _ in range(n_batches * n_timesteps):
        torch.randn(shape, generator=generator, dtype=torch.float32)


def partial_path(path, rank: int = 0, world: int = 1) -> Path:
    """Where rank `rank` of `world` keeps its running sums for the Gamma file at `path`."""
    path = Path(path)
    return path.with_name(f"{path.name}.partial{rank}of{world}")


def estimate_shard(model, data: torch.Tensor, schedule, path, *, mid: str, dataset: str, timesteps=None,
                   batch_size: int = 256, seed: int = 0, rank: int = 0, world: int = 1, save_every: int = 1,
                   max_batches: Optional[int] = None, progress: bool = True, device=None,
                   labels: Optional[torch.Tensor] = None, guidance: Optional[dict] = None) -> Optional[GammaStats]:
    """This rank's part of the estimate over `data` (all M points, same order on every rank): the sums over
    the points of its batches `rank_batches(M, batch_size, rank, world)`, each with the noise it gets in one
    process. Partial results go to `<path>.partial<rank>of<world>` every `save_every` batches and are picked
    up by the next call. `max_batches` stops after that many batches of this call and returns None (an
    interruption, for tests). No collectives: the ranks' GammaStats add up to the single-process ones.
    labels: each point's class (a class-conditional model is called with them); guidance: the settings of a
    guided model (strategies.guidance.guidance_key), part of the key of the partial files.
    """
    path = Path(path)
    M = len(data)
    ts = check_timesteps(timesteps, schedule.N)
    bs = int(batch_size)
    batches = rank_batches(M, bs, rank, world)
    block = data[batches.start * bs: min(batches.stop * bs, M)]
    block_y = None if labels is None else labels[batches.start * bs: min(batches.stop * bs, M)]
    partial = partial_path(path, rank, world)
    key = {"model_id": mid, "dataset": dataset, "M": M, "world": world, "seed": int(seed),
           "schedule_id": schedule_id(schedule), "timesteps": ts.tolist(), "batch_size": bs, "guidance": guidance,
           "labels": labels is not None}
    generator = torch.Generator().manual_seed(_noise_seed(seed))
    stats = None
    if partial.exists():
        st, meta = load_tensors(partial, PARTIAL_KIND, "delete it and rerun (the estimate starts over)")
        if meta.get("key") == jsonable(key):
            stats = GammaStats(st["timesteps"].numpy(), st["sum"].numpy(), st["sumsq"].numpy(), int(meta["count"]))
            generator.set_state(st["generator"])
            if progress:
                print(f"[fewstep] gamma: resuming from {partial} ({stats.count}/{len(block)} points of rank {rank})")
        elif progress:
            print(f"[fewstep] gamma: ignoring {partial} (made with other settings)")
    if stats is None:
        stats = GammaStats(ts)
        if len(block):                                       # the noise of the batches of the ranks before
            _skip_noise(generator, batches.start, bs, data.shape[1:], len(ts))
    legacy = path.with_name(f"{path.stem}.pt.partial{rank}of{world}")
    if legacy != partial and legacy.exists() and progress:
        print(f"[fewstep] gamma: not reading {legacy} (the earlier pickle format, which can run code); "
              f"the estimate starts over, delete that file")

    def save_partial(s: GammaStats):
        save_tensors(partial, {"timesteps": torch.as_tensor(s.timesteps), "sum": torch.as_tensor(s.sum),
                               "sumsq": torch.as_tensor(s.sumsq), "generator": generator.get_state()},
                     PARTIAL_KIND, {"key": key, "count": int(s.count)})

    done = stats.count
    todo = block[done:]
    starts = list(range(0, len(todo), bs))
    stopped = max_batches is not None and max_batches < len(starts)
    starts = starts[:max_batches] if max_batches is not None else starts
    dev = device if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    todo_y = None if block_y is None else block_y[done:]
    xs = (todo[i: i + bs].to(dev) if todo_y is None else (todo[i: i + bs].to(dev), {"class_labels": todo_y[i: i + bs].to(dev)})
          for i in starts)
    counter = {"n": 0}

    def checkpoint(s: GammaStats):
        counter["n"] += 1
        if counter["n"] % max(int(save_every), 1) == 0:
            save_partial(s)

    path.parent.mkdir(parents=True, exist_ok=True)
    stats = estimate_gamma(model, xs, schedule, generator=generator, stats=stats, callback=checkpoint,
                           progress=progress and rank == 0, total=len(starts))
    save_partial(stats)
    return None if stopped else stats


def estimate_to_file(model, data: torch.Tensor, schedule, path, *, mid: str, dataset: str, timesteps=None,
                     batch_size: int = 256, seed: int = 0, rank: int = 0, world: int = 1, save_every: int = 1,
                     max_batches: Optional[int] = None, progress: bool = True, pretrained=None, device=None,
                     extra: Optional[dict] = None, labels: Optional[torch.Tensor] = None,
                     guidance: Optional[dict] = None) -> Optional[dict]:
    """Estimate Gamma over `data` (all M points, same order on every rank) and write the Gamma file at `path`.

    Every rank runs `estimate_shard` (resumable, see there); the ranks' sums are gathered and added in rank
    order and global rank 0 writes the file, after which every rank deletes its partial. With world > 1,
    torch.distributed must be initialised (run_parallel does it). `max_batches`: an interruption (returns
    None). Otherwise returns the loaded Gamma file on rank 0, None on the other ranks.
    """
    path = Path(path)
    stats = estimate_shard(model, data, schedule, path, mid=mid, dataset=dataset, timesteps=timesteps,
                           batch_size=batch_size, seed=seed, rank=rank, world=world, save_every=save_every,
                           max_batches=max_batches, progress=progress, device=device, labels=labels,
                           guidance=guidance)
    if stats is None:
        return None
    M = len(data)
    dist = Dist(rank, world, None)
    parts = all_gather(stats, dist)              # every rank's sums, in rank order (a no-op for one process)
    total = parts[0]
    for p in parts[1:]:
        total = total.merge(p)
    if total.count != M:
        raise RuntimeError(f"Gamma estimate covers {total.count} points, expected M = {M}")
    error = None
    if dist.is_global_zero:
        try:
            save_gamma(path, total, model_id=mid, dataset=dataset, schedule=schedule, pretrained=pretrained,
                       world_size=world, seed=int(seed), guidance=guidance, **(extra or {}))
        except BaseException as e:            # the other ranks must not wait for it, nor drop their partials
            error = e
    written = all_gather(error is None, dist)[0]
    if error is not None:
        raise error
    if not written:
        return None
    partial_path(path, rank, world).unlink(missing_ok=True)
    return load_gamma(path, mid, schedule, guidance=guidance) if dist.is_global_zero else None


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
    skip = cfg.skip
    rho_on = any(float(skip[k]) != 1.0 for k in ("rho_top", "rho_bottom") if k in skip)   # skip=linear's keys
    return skip.name not in ("none", "linear") or rho_on


def _settings(cfg) -> dict:
    """The task's settings from the config, checked (ConfigError, one line)."""
    from omegaconf import OmegaConf

    from ..build import build_schedule

    tc = cfg.task
    s = {"M": _positive_int(tc.M, "task.M"),
         "bs": _positive_int(tc.batch_size, "task.batch_size"),          # conf/task/gamma.yaml: ${batch_size}
         "save_every": _positive_int(tc.save_every, "task.save_every"),
         "schedule": build_schedule(cfg.backbone.schedule), "split": tc.split,
         "dataset": cfg.dataset.name, "seed": int(cfg.seed)}
    ts = tc.timesteps
    try:
        s["ts"] = check_timesteps(list(ts) if OmegaConf.is_list(ts) else ts, s["schedule"].N)
    except ValueError as e:
        raise ConfigError(f"task.{e}") from None
    return s


def _points(cfg, s: dict, with_labels: bool = False):
    """The M data points of the estimate: a random subset (seeded from `seed`) of the split, in that order;
    with_labels (a class-conditional model): (points, their labels)."""
    from ..data import load_dataset

    data = load_dataset(cfg.dataset, s["split"], with_labels=with_labels)
    x, y = data if with_labels else (data[0] if isinstance(data, (tuple, list)) else data, None)
    M = s["M"]
    if M > len(x):
        raise ConfigError(f"task.M={M} exceeds the {len(x)} points of {s['dataset']} ({s['split']}); "
                          f"use task.M <= {len(x)}")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(s["seed"]))[:M]
    return (x[pick], y[pick]) if with_labels else x[pick]


def gamma_rank(dist: Dist, cfg) -> Optional[dict]:
    """task=gamma on one rank: this rank's batches, the sums combined, rank 0 writes the file. Returns the
    summary on global rank 0, None on the other ranks. With dist = SINGLE it is the plain single process."""
    from ..build import build_denoiser, class_embeds, resolve_device

    from ..strategies.guidance import guidance_key

    tc = cfg.task
    s = _settings(cfg)
    schedule, M, dataset, lead = s["schedule"], s["M"], s["dataset"], dist.is_global_zero
    n_embeds = class_embeds(cfg.backbone)                     # read from the config: data before any model
    data, labels = _points(cfg, s, with_labels=True) if n_embeds else (_points(cfg, s), None)
    if labels is not None and int(labels.max()) >= n_embeds - 1:
        raise ConfigError(f"dataset={dataset} has classes 0..{int(labels.max())}, the network's class embedding "
                          f"only 0..{n_embeds - 2} (and the null class {n_embeds - 1})")
    device = dist.device if dist.world > 1 and dist.device is not None else resolve_device(cfg.device)
    model = build_denoiser(cfg, device)
    model.eval()
    model.cache = None  # Gamma is a property of the network: no cached partial forwards across timesteps
    guidance = guidance_key(cfg.guidance)
    mid = model_id(model.backbone)
    out = Path(os.path.expanduser(str(tc.out_dir or default_out_dir(cfg))))
    path = out / gamma_filename(mid, dataset, M, guidance)
    if path.exists() and not tc.overwrite:
        g = load_gamma(path, mid, schedule, guidance=guidance)
        have = g["timesteps"].numpy()
        if not np.array_equal(have, np.asarray(s["ts"])):   # the file's name keys (model, dataset, M), not timesteps
            raise ConfigError(f"{path} holds Gamma at {len(have)} timesteps, not the {len(s['ts'])} task.timesteps asks "
                              f"for: task.overwrite=true to re-estimate it (or another task.M / task.out_dir)")
        if not lead:
            return None
        print(f"[fewstep] gamma: {path} exists (task.overwrite=true to re-estimate)")
        return summary(g)
    if lead and _strategies_active(cfg):
        print("[fewstep] gamma: note: skip scaling is active and goes into this Gamma (the cache is not used); "
              "the file is keyed by the network weights only")
    n_batches = math.ceil(M / s["bs"])
    if lead and dist.world > n_batches:
        print(f"[fewstep] gamma: note: {M} points make {n_batches} batches of task.batch_size={s['bs']}: only "
              f"{n_batches} of the {dist.world} processes have work (lower task.batch_size)")
    pre = cfg.backbone.pretrained
    g = estimate_to_file(model, data, schedule, path, mid=mid, dataset=dataset, timesteps=s["ts"], batch_size=s["bs"],
                         seed=s["seed"], rank=dist.rank, world=dist.world, save_every=s["save_every"], progress=True,
                         pretrained=pre, device=device, labels=labels, guidance=guidance,
                         extra={"split": s["split"], "backbone": cfg.backbone.name,
                                "skip": str(cfg.skip.name), "skip_active": _strategies_active(cfg)})
    if not lead:
        return None
    result = summary(g)
    if dist.world > 1:
        result["world_size"] = dist.world
    print(f"[fewstep] gamma: wrote {path}  (Gamma in [{result['gamma_min']:.4f}, {result['gamma_max']:.4f}], "
          f"max stderr {result['stderr_max']:.2e})")
    return result


def _plain(cfg):
    """A resolved copy of the config for the spawned ranks (they have no Hydra context to resolve in)."""
    from omegaconf import OmegaConf

    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def run(cfg) -> dict:
    """Estimate Gamma for cfg's model (see the module docstring). Returns the summary; an empty dict in the
    processes of a multi-process job that are not global rank 0."""
    import torch.distributed as tdist

    trainer = cfg.trainer
    if not (is_multiprocess(trainer) or (tdist.is_available() and tdist.is_initialized())):
        return gamma_rank(SINGLE, cfg)
    from ..parallel import validate_trainer_cfg   # task=gamma is not a sampling task: its one validation

    try:
        validate_trainer_cfg(trainer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _points(cfg, _settings(cfg))     # the user's mistakes as one line here, before any process is started
    result = run_parallel(trainer, gamma_rank, _plain(cfg))
    return result if result is not None else {}
