"""Samplers: one short function per family, over any callable `model(x, t, **extra_args) -> eps`.

    ddpm       ancestral (Ho et al. 2020) on any timestep subsequence        ddpm.py
    ddim       generalized DDIM step, eta >= 0 (Song et al. 2021, eq. 12)    ddim.py
    dpmpp      DPM-Solver++ multistep, orders 1-3 (Lu et al. 2022)           dpmpp.py
    euler/heun EDM Alg. 1 in sigma space (Karras et al. 2022)               edm.py
    diffusers  any DDPM-type diffusers scheduler, by class name              diffusers_sampler.py

`sample(cfg, model, z, noise, schedule, variance, callback, extra_args)` is the one entry point the
tasks use. A sampler needs nothing of the model but eps: the data prediction x0 comes from eps and the
schedule (`schedule.x0_from_eps`). `extra_args` (e.g. a condition) go to every model call untouched, as in
k-diffusion; `callback(i, t, x, x0)` sees the state x_t (VP form, what the network sees) and the data
prediction before each step (for diagnostics: skip norms, probing). `planned_nfe` says how many model
calls a config makes before any is made (DeepCache plans its schedule with it). NFE is counted by the model. Nothing here forces torch.no_grad(): wrap the call yourself when sampling,
leave it off to back-propagate through the sampler (e.g. to fit skip coefficients).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..schedule import SPACINGS, select_timesteps
from .ddim import sample_ddim
from .ddpm import VAR_TYPES, sample_ddpm
from .diffusers_sampler import planned_calls, sample_diffusers, scheduler_class
from .dpmpp import check_lower_order_final, sample_dpmpp
from .edm import edm_sigmas, sample_euler, sample_heun

SAMPLERS = ("ddpm", "ddim", "dpmpp", "euler", "heun", "diffusers")
VARIANCE_SAMPLERS = ("ddpm", "ddim")  # the samplers whose steps take a reverse variance (variance=analytic)
ANALYTIC_DP = "analytic_dp"  # timesteps chosen by the Analytic-DPM dynamic programme of the variance rule

__all__ = ["SAMPLERS", "VARIANCE_SAMPLERS", "sample", "planned_nfe", "names_analytic_dp", "sampler_timesteps", "validate_sampler_cfg", "sample_ddim", "sample_ddpm",
           "sample_dpmpp", "sample_euler", "sample_heun", "sample_diffusers"]


def _kwargs(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    kw = cfg.kwargs or {}
    if isinstance(kw, DictConfig):
        kw = OmegaConf.to_container(kw, resolve=True)
    return dict(kw)


def validate_sampler_cfg(cfg) -> None:
    """Check a sampler config node (conf/sampler/<name>.yaml, every key set) before anything heavy is built;
    one-line ValueError on bad input. tasks.validate calls it once per run, never per batch."""
    name = cfg.name
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}' (choose from {', '.join(SAMPLERS)})")
    steps = cfg.steps
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sampler.steps must be an integer >= 1 (got {steps!r})")
    if name == "diffusers":
        scheduler_class(cfg.scheduler)
        kw = cfg.kwargs
        if kw is not None and not hasattr(kw, "keys"):
            raise ValueError(f"sampler.kwargs must be a mapping of scheduler arguments (got {kw!r})")
        return
    spacing = cfg.timesteps
    if spacing not in SPACINGS + (ANALYTIC_DP,):
        raise ValueError(f"unknown timestep spacing '{spacing}' (choose from {', '.join(SPACINGS + (ANALYTIC_DP,))})")
    endpoint = cfg.endpoint
    if not isinstance(endpoint, bool):
        raise ValueError(f"sampler.endpoint must be true or false (got {endpoint!r})")
    if not endpoint and spacing == ANALYTIC_DP:
        raise ValueError("sampler.endpoint=false does not apply to timesteps=analytic_dp (the trajectory is optimised as a whole)")
    if name in ("ddim", "ddpm") and not isinstance(cfg.clip_x0, bool):
        raise ValueError(f"sampler.clip_x0 must be true or false (got {cfg.clip_x0!r})")
    if name == "ddim" and not float(cfg.eta) >= 0:
        raise ValueError(f"sampler.eta must be >= 0 (got {cfg.eta})")
    if name == "ddpm" and cfg.var_type not in VAR_TYPES:
        raise ValueError(f"unknown sampler.var_type '{cfg.var_type}' (choose from {', '.join(VAR_TYPES)})")
    if name == "dpmpp":
        if cfg.order not in (1, 2, 3):
            raise ValueError(f"sampler.order must be 1, 2 or 3 (got {cfg.order!r})")
        check_lower_order_final(cfg.lower_order_final)


def names_analytic_dp(cfg) -> bool:
    """Whether the sampler config asks for the Analytic-DPM trajectory (timesteps=analytic_dp), which the
    sampler cannot lay out itself (a diffusers scheduler has no `timesteps` option: its own spacing)."""
    return cfg.name != "diffusers" and cfg.timesteps == ANALYTIC_DP


def sampler_timesteps(cfg, schedule, timesteps=None) -> np.ndarray:
    """Decreasing float64 timesteps of a native sampler: the explicit `timesteps` when given (any order;
    a jump to data, t = -1, is dropped: every sampler ends with it), else the cfg.timesteps spacing.
    timesteps=analytic_dp names a trajectory made outside the sampler (build.explicit_timesteps asks the
    Analytic-DPM rule for it), so it must come in explicitly."""
    if timesteps is not None:
        ts = np.asarray(timesteps, dtype=np.float64)
        return np.sort(ts[ts >= 0])[::-1].copy()
    spacing = cfg.timesteps
    if spacing == ANALYTIC_DP:
        raise ValueError("timesteps=analytic_dp is the Analytic-DPM optimal trajectory (variance=analytic): "
                         "pass it as explicit timesteps")
    return select_timesteps(schedule, int(cfg.steps), spacing, endpoint=bool(cfg.endpoint))


def planned_nfe(cfg, schedule, timesteps=None) -> int:
    """The number of model calls `sample(cfg, ...)` will make: one per timestep, Heun's 2 M - 1 (no
    correction on the last step), a diffusers scheduler's own timestep count."""
    name = cfg.name
    if name == "diffusers":
        return planned_calls(schedule, cfg.scheduler, int(cfg.steps), _kwargs(cfg))
    m = len(sampler_timesteps(cfg, schedule, timesteps))
    return 2 * m - 1 if name == "heun" else m


def sample(cfg, model, z: torch.Tensor, noise, schedule, variance=None, callback=None,
           extra_args: Optional[dict] = None, timesteps=None) -> torch.Tensor:
    """x_0 from initial noise z ~ N(0, I) with the sampler described by the config node `cfg`.

    noise: a SampleNoise (per-sample N(0, I) for stochastic steps; its generators feed stochastic
    diffusers schedulers). variance: an optional reverse-variance rule variance(t, s, lam2) -> sigma2
    used by ddpm and ddim (Analytic-DPM; validation refuses it elsewhere). callback(i, t, x, x0) and
    extra_args: see the module docstring. timesteps: an explicit trajectory (see sampler_timesteps).
    The config is not validated here: the tasks validate it once, before anything is built.
    """
    name = cfg.name
    kw = dict(callback=callback, extra_args=extra_args)
    if name == "diffusers":
        return sample_diffusers(model, z, schedule, cfg.scheduler, int(cfg.steps), _kwargs(cfg),
                                noise=noise, **kw)
    ts = sampler_timesteps(cfg, schedule, timesteps)
    if name == "ddim":
        return sample_ddim(model, z, ts, schedule, eta=float(cfg.eta), noise=noise, variance=variance,
                           clip_x0=cfg.clip_x0, **kw)
    if name == "ddpm":
        return sample_ddpm(model, z, ts, schedule, var_type=cfg.var_type, noise=noise,
                           variance=variance, clip_x0=cfg.clip_x0, **kw)
    if name == "dpmpp":
        return sample_dpmpp(model, z, ts, schedule, order=int(cfg.order),
                            lower_order_final=cfg.lower_order_final, **kw)
    x = float(edm_sigmas(ts, schedule)[0]) * z  # EDM: x = sigma_max z in VE space
    return (sample_euler if name == "euler" else sample_heun)(model, x, ts, schedule, **kw)
