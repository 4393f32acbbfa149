"""DDIM (Song, Meng, Ermon, ICLR 2021), the generalized non-Markovian step, eq. 12.

From timestep t to the next (smaller) timestep s, with x0 = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t):

    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - lam2) eps + sigma z,     z ~ N(0, I)

    lam2 = eta^2 beta_tilde,   beta_tilde = (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)   (eq. 16)

and sigma^2 = lam2, or `variance(t, s, lam2)` when a variance rule (e.g. Analytic-DPM) is given:
the rule changes the noise only, never the mean. eta = 0 is the deterministic DDIM ODE sampler
(use it for few steps); eta = 1 is DDPM-like ancestral sampling (needs many steps).

The last jump goes to ab = 1 (s = -1, clean data), like diffusers' `set_alpha_to_one=True`;
no noise is added on that jump (beta_tilde is 0 there anyway).

clip_x0 (off by default): clip the data prediction to the data range [-1, 1] inside the step, as the
official Analytic-DPM DDIM sampler and diffusers' DDIMScheduler(clip_sample=True) do: the clipped x0 takes
the place of x0 in eq. 12 and eps stays the network's (ddpm.py's clip re-derives eps instead, which makes its
step the posterior mean at the clipped x0, as Ho et al.'s sampler). It changes the mean, not only the noise,
so the step is no longer the ODE's: compare results within one setting.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

Noise = Callable[[], torch.Tensor]
VarianceRule = Callable[[float, float, float], float]
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], None]   # callback(i, t, x_t, x0_pred)


def jumps(ts: np.ndarray):
    """Pairs (t, s) along decreasing timesteps ts, ending with the jump to clean data s = -1."""
    ts = [float(t) for t in np.asarray(ts, dtype=np.float64)]
    return list(zip(ts, ts[1:] + [-1.0]))


def beta_tilde(ab_t: float, ab_s: float) -> float:
    """DDPM posterior variance of the jump t -> s: (1 - ab_s)/(1 - ab_t) * beta_{t|s}, beta_{t|s} = 1 - ab_t/ab_s."""
    return (1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s)


def clipped_prediction(x: torch.Tensor, x0: torch.Tensor, ab_t: float):
    """(x0, eps) with x0 clipped to [-1, 1] and eps recomputed from it: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
    still holds, so the generalized step's mean is the posterior mean of the clipped x0 (ancestral DDPM)."""
    x0 = x0.clamp(-1.0, 1.0)
    return x0, (x - math.sqrt(ab_t) * x0) / math.sqrt(1.0 - ab_t)


def generalized_step(x0: torch.Tensor, eps: torch.Tensor, ab_s: float, lam2: float, sigma2: float,
                     noise: Optional[Noise]) -> torch.Tensor:
    """DDIM eq. 12: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - lam2) eps + sqrt(sigma2) z."""
    x = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - lam2, 0.0)) * eps
    if sigma2 > 0:
        z = noise() if noise is not None else torch.randn_like(x)
        x = x + math.sqrt(sigma2) * z.to(device=x.device, dtype=x.dtype)
    return x


def sample_ddim(model, x: torch.Tensor, ts: np.ndarray, schedule, eta: float = 0.0,
                noise: Optional[Noise] = None, variance: Optional[VarianceRule] = None,
                callback: Optional[Callback] = None, extra_args: Optional[dict] = None,
                clip_x0: bool = False) -> torch.Tensor:
    """DDIM sampling from x = x_T ~ N(0, I) over decreasing timesteps ts (fractional allowed).

    `model(x, t, **extra_args) -> eps` is any callable; `noise()` gives the N(0, I) draws of the stochastic
    steps (eta > 0 or a variance rule); pass a SampleNoise for per-sample reproducibility (torch.randn_like
    when None). `callback(i, t, x, x0)` sees each step's state and data prediction before the step (the
    clipped one with clip_x0, see the module docstring).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (got {eta})")
    extra_args = extra_args or {}
    for i, (t, s) in enumerate(jumps(ts)):
        ab_t, ab_s = float(schedule.alpha_bar_at(t)), float(schedule.alpha_bar_at(s))
        eps = model(x, t, **extra_args)
        x0 = schedule.x0_from_eps(x, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)       # eps stays the network's (the official DDIM sampler)
        if callback is not None:
            callback(i, t, x, x0)
        lam2 = eta ** 2 * beta_tilde(ab_t, ab_s)
        sigma2 = 0.0 if s < 0 else (lam2 if variance is None else float(variance(t, s, lam2)))
        x = generalized_step(x0, eps, ab_s, lam2, sigma2, noise)
    return x
