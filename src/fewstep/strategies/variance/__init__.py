"""Reverse-process variance rules (config group `variance`): fixed, or Analytic-DPM (Bao, Li, Zhu, Zhang,
ICLR 2022, arXiv 2201.06503).

    analytic.py     the formulas: Theorem 1's optimal variance clipped to Theorem 2's bounds
                    (`analytic_sigma2`), the rules `AnalyticVariance` / `FixedVariance`
    gamma.py        Gamma_t = E ||eps_theta(x_t, t)||^2 / d: Monte Carlo estimate (`estimate_gamma`,
                    run by `task=gamma`) and its safetensors files (save / load / find)
    trajectory.py   the optimal K-step trajectory by dynamic programming (`dp_trajectory`)

and `fewstep.identity` (`model_id`, `schedule_id`) says which model and schedule a Gamma file belongs to.
This module turns the config into a rule (`build_variance`) and keeps every name importable from here.
"""
from __future__ import annotations

import os
from typing import Optional

from ...identity import model_id, schedule_id
from ...schedule import NoiseSchedule
from .analytic import AnalyticVariance, FixedVariance, analytic_sigma2, pixel_cap2
from .gamma import (GAMMA_FORMAT, GAMMA_KIND, GAMMA_SUFFIX, LEGACY_SUFFIX, GammaMismatch, GammaMissing, GammaStats,
                    check_timesteps, estimate_gamma, find_gamma, gamma_command, gamma_filename, load_gamma,
                    save_gamma)
from .trajectory import dp_trajectory, jump_cost, least_cost_path, split_reliable, trajectory_cost

__all__ = [
    "AnalyticVariance", "FixedVariance", "analytic_sigma2", "pixel_cap2",
    "GAMMA_FORMAT", "GAMMA_KIND", "GAMMA_SUFFIX", "LEGACY_SUFFIX", "GammaMismatch", "GammaMissing", "GammaStats",
    "check_timesteps", "estimate_gamma", "find_gamma", "gamma_command", "gamma_filename", "load_gamma", "save_gamma",
    "dp_trajectory", "jump_cost", "least_cost_path", "split_reliable", "trajectory_cost",
    "model_id", "schedule_id",
    "VARIANCES", "validate_variance_cfg", "build_variance",
]

VARIANCES = ("fixed", "analytic")


def _search_dirs(search_dirs) -> list:
    dirs = list(search_dirs or [])
    return [os.path.expanduser(str(d)) for d in dirs if d not in (None, "")]


def _clip_pixel(value) -> Optional[float]:
    """variance.clip_pixel: a number > 0 or None (its per-sampler default is resolved with the config)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"variance.clip_pixel must be null or a number > 0 (got {value!r}); its default follows "
                         f"the sampler (2 for ddpm, 1 for ddim)")
    return float(value)


def _data_range(value):
    if value is None:
        return None
    a, b = (float(v) for v in value)
    if not b > a:
        raise ValueError(f"variance.data_range must be [a, b] with a < b, or null (got {list(value)})")
    return (a, b)


def validate_variance_cfg(cfg_variance) -> None:
    """Cheap checks before anything heavy is built (tasks.validate calls it once per run); one-line ValueError."""
    name = cfg_variance.name
    if name not in VARIANCES:
        raise ValueError(f"unknown variance '{name}' (choose from {', '.join(VARIANCES)})")
    if name == "analytic":
        _clip_pixel(cfg_variance.clip_pixel)
        _data_range(cfg_variance.data_range)


def analytic_dpm(schedule: NoiseSchedule, model_id: str, guidance: Optional[dict], all_timesteps: bool = False, *,
                 gamma_path, search_dirs, clip_pixel, data_range, dataset, backbone, pretrained) -> AnalyticVariance:
    """variance=analytic (conf/variance/analytic.yaml) -> AnalyticVariance with the model's Gamma.

    Gamma comes from gamma_path, else from the best matching gamma_<model_id>_*.safetensors in search_dirs
    (the pretrained folder, then the cache folder); a missing or foreign file is a one-line error naming the
    `python run.py task=gamma ...` command that makes the right one (from dataset, backbone, pretrained).
    guidance (strategies.guidance.guidance_key): the guided eps is another model, so only a Gamma made with
    the same guidance settings is taken. all_timesteps (sampler.timesteps=analytic_dp): the optimal trajectory
    needs Gamma at every timestep, so a file estimated at all of them is preferred and a strided one refused
    (one line naming the command with task.timesteps=all)."""
    clip_pixel = _clip_pixel(clip_pixel)
    data_range = _data_range(data_range)
    command = gamma_command({"dataset": dataset, "backbone": backbone, "pretrained": pretrained})
    path = gamma_path
    if not path:
        dirs = _search_dirs(search_dirs)
        path = find_gamma(model_id, dirs, dataset, guidance, complete_for=schedule.N if all_timesteps else None)
        if path is None:
            where = ", ".join(dirs) if dirs else "no variance.search_dirs"
            what = "" if guidance is None else f" with guidance {guidance}"
            raise GammaMissing(f"no Gamma file for model {model_id}{what} (searched {where}): estimate it with "
                               f"`{command}` or pass variance.gamma_path=...")
    g = load_gamma(path, model_id, schedule, command, guidance=guidance)
    rule = AnalyticVariance(schedule, g["gamma"].numpy(), g["timesteps"].numpy(), clip_pixel=clip_pixel,
                            data_range=data_range, model_id=model_id, path=g["path"])
    if all_timesteps:
        rule.require_complete(command)
    return rule


def build_variance(cfg_variance, schedule: NoiseSchedule, model_id: str, guidance: Optional[dict] = None,
                   all_timesteps: bool = False):
    """A validated cfg.variance (conf/variance/*.yaml, every key set; its `_target_` is analytic_dpm above) ->
    None for variance=fixed (the sampler's own variance), else the variance rule. all_timesteps: the rule will
    lay out the optimal trajectory (sampler.timesteps=analytic_dp), which needs Gamma at every timestep."""
    from ...config import instantiate

    return instantiate(cfg_variance, schedule=schedule, model_id=model_id, guidance=guidance, all_timesteps=all_timesteps)
