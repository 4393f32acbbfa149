"""Ancestral DDPM sampling (Ho et al. 2020) on any timestep subsequence.

The reverse step t -> s is the Gaussian posterior q(x_s | x_t, x0) with x0 predicted by the model:
its mean is the DDPM posterior mean, which is the DDIM generalized step (eq. 12 of Song et al.
2021) with lam2 = beta_tilde, and its variance is

    var_type "beta_tilde":  sigma^2 = beta_tilde = (1 - ab_s)/(1 - ab_t) beta_{t|s}  (lower bound, the posterior)
    var_type "beta":        sigma^2 = beta_{t|s} = 1 - ab_t / ab_s                   (upper bound)

or `variance(t, s, lam2=beta_tilde)` when a variance rule is given (Analytic-DPM: optimal in KL,
Bao et al. 2022). Ho et al. found both fixed choices equal at 1000 steps; on short subsequences
beta_tilde is much better for FID and beta for likelihood. No noise on the final jump to data.
clip_x0 clips the predicted x0 to [-1, 1] and takes the posterior mean at it (eps re-derived from the
clipped x0), as Ho et al.'s and the official Analytic-DPM DDPM samplers and diffusers'
DDPMScheduler(clip_sample=True) do.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .ddim import Callback, Noise, VarianceRule, beta_tilde, clipped_prediction, generalized_step, jumps

VAR_TYPES = ("beta_tilde", "beta")


def sample_ddpm(model, x: torch.Tensor, ts: np.ndarray, schedule, var_type: str = "beta_tilde",
                noise: Optional[Noise] = None, variance: Optional[VarianceRule] = None,
                callback: Optional[Callback] = None, extra_args: Optional[dict] = None,
                clip_x0: bool = False) -> torch.Tensor:
    """Ancestral sampling from x = x_T ~ N(0, I) over decreasing timesteps ts; model, callback,
    extra_args and clip_x0 as in sample_ddim."""
    if var_type not in VAR_TYPES:
        raise ValueError(f"unknown var_type '{var_type}' (choose from {', '.join(VAR_TYPES)})")
    extra_args = extra_args or {}
    for i, (t, s) in enumerate(jumps(ts)):
        ab_t, ab_s = float(schedule.alpha_bar_at(t)), float(schedule.alpha_bar_at(s))
        eps = model(x, t, **extra_args)
        x0 = schedule.x0_from_eps(x, t, eps)
        if clip_x0:
            x0, eps = clipped_prediction(x, x0, ab_t)
        if callback is not None:
            callback(i, t, x, x0)
        lam2 = beta_tilde(ab_t, ab_s)
        if s < 0:
            sigma2 = 0.0
        elif variance is not None:
            sigma2 = float(variance(t, s, lam2))
        else:
            sigma2 = lam2 if var_type == "beta_tilde" else 1.0 - ab_t / ab_s
        x = generalized_step(x0, eps, ab_s, lam2, sigma2, noise)
    return x
