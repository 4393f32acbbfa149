"""EDM samplers (Karras et al. 2022, Alg. 1, deterministic) for a VP eps-model, in sigma space.

The VP state x_vp = sqrt(ab) (x0 + sigma eps) becomes x = x_vp / sqrt(ab) = x0 + sigma eps (VE),
with sigma = sqrt((1 - ab) / ab). The denoiser of EDM eq. 7 / Table 1 (VP preconditioning) is

    D(x, sigma) = x - sigma * eps_theta(x / sqrt(1 + sigma^2), t(sigma)),   t(sigma) = schedule.sigma_to_t(sigma)

(fractional t), and the probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma.
Sigmas come from the timesteps (karras spacing, rho = 7, by default), plus a final sigma = 0.

    euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i.        NFE = steps. (Equals DDIM with eta = 0.)
    heun:  a 2nd-order correction at sigma_{i+1} (Alg. 1 lines 9-11), skipped on the last step to
           sigma = 0 (Euler there), so NFE = 2 steps - 1. Better than Euler at equal NFE.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def edm_sigmas(ts: np.ndarray, schedule) -> np.ndarray:
    """sigma_0 > ... > sigma_{M-1} of the timesteps, plus the final sigma_M = 0."""
    return np.append(np.exp(schedule.log_sigma_at(np.asarray(ts, dtype=np.float64))), 0.0)


def edm_denoiser(model, schedule, extra_args=None):
    """D(x, sigma) for a VP eps-prediction model (EDM Table 1, VP column)."""
    extra_args = extra_args or {}

    def D(x: torch.Tensor, sigma: float) -> torch.Tensor:
        eps = model(x / math.sqrt(1.0 + sigma ** 2), float(schedule.sigma_to_t(sigma)), **extra_args)
        return x - sigma * eps
    return D


def _report(callback, i, sigma, schedule, x, denoised):
    """callback(i, t, x, x0) in the VP terms of the other samplers: x_vp = x / sqrt(1 + sigma^2), x0 = D."""
    if callback is not None:
        callback(i, float(schedule.sigma_to_t(sigma)), x / math.sqrt(1.0 + sigma ** 2), denoised)


def sample_euler(model, x: torch.Tensor, ts: np.ndarray, schedule, callback=None, extra_args=None) -> torch.Tensor:
    """EDM Euler from x = sigma_0 z (VE); returns x at sigma = 0. callback(i, t, x_vp, x0) at each step."""
    D, sigmas = edm_denoiser(model, schedule, extra_args), edm_sigmas(ts, schedule)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = D(x, s)
        _report(callback, i, s, schedule, x, denoised)
        d = (x - denoised) / s                                 # Alg. 1 line 7
        x = x + (s_next - s) * d                               # line 8
    return x


def sample_heun(model, x: torch.Tensor, ts: np.ndarray, schedule, callback=None, extra_args=None) -> torch.Tensor:
    """EDM Heun (Alg. 1, deterministic: S_churn = 0) from x = sigma_0 z (VE); returns x at sigma = 0.
    callback(i, t, x_vp, x0) at each step's first evaluation."""
    D, sigmas = edm_denoiser(model, schedule, extra_args), edm_sigmas(ts, schedule)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = D(x, s)
        _report(callback, i, s, schedule, x, denoised)
        d = (x - denoised) / s                                 # line 7
        x_next = x + (s_next - s) * d                          # line 8 (Euler step)
        if s_next > 0:                                         # lines 9-11: 2nd-order correction
            d_next = (x_next - D(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return x
