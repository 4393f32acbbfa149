"""Discrete-time noise schedules (DDPM) and timestep selection.

Conventions (those of diffusers and of the released DDPM checkpoints):

* the model is trained on N discrete timesteps ``t = 0 .. N-1``;
  ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
  (Papers index them ``n = 1 .. N``; ``n = t + 1``.)
* ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` is the VE noise level of the
  same process (x / sqrt(alpha_bar) = x_0 + sigma eps), used by the EDM samplers;
* ``lambda_t = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)) = -log sigma_t`` is
  the half log-SNR used by DPM-Solver.

A fractional timestep ``t`` in [0, N-1] is defined by interpolating ``log sigma``
linearly between the integer timesteps (the k-diffusion ``DiscreteSchedule``
convention), so continuous-time samplers can query the discrete model anywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace", "logsnr", "quadratic", "karras")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(kind: str = "linear", n: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 2e-2) -> np.ndarray:
    """DDPM betas in float64.

    linear: Ho et al. 2020, beta_t linear in [beta_start, beta_end].
    scaled_linear: sqrt(beta_t) linear in [sqrt(beta_start), sqrt(beta_end)] (Stable Diffusion's, with
            0.00085 .. 0.012; diffusers' beta_schedule="scaled_linear").
    cosine: Nichol & Dhariwal 2021, alpha_bar(t) = cos^2(((t/N + s)/(1 + s)) pi/2), s = 0.008,
            betas clipped at 0.999 (as in improved-diffusion and diffusers' squaredcos_cap_v2).
    """
    if kind == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    if kind == "cosine":
        s = 0.008
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule '{kind}' (choose from {', '.join(BETA_SCHEDULES)})")


@dataclass
class NoiseSchedule:
    """alpha_bar, sigma and lambda of a discrete DDPM schedule, on N timesteps."""

    betas: np.ndarray

    @classmethod
    def from_config(cls, kind: str = "linear", n: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 2e-2) -> "NoiseSchedule":
        return cls(make_betas(kind, n, beta_start, beta_end))

    def __post_init__(self):
        self.betas = np.asarray(self.betas, dtype=np.float64)
        self.alpha_bar = np.cumprod(1.0 - self.betas)
        self.log_sigmas = 0.5 * (np.log1p(-self.alpha_bar) - np.log(self.alpha_bar))

    @property
    def N(self) -> int:
        return len(self.betas)

    @property
    def sigmas(self) -> np.ndarray:
        return np.exp(self.log_sigmas)

    @property
    def lambdas(self) -> np.ndarray:
        return -self.log_sigmas

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # --- continuous views --------------------------------------------------------------
    def log_sigma_at(self, t):
        """log sigma at (fractional) timestep t, linear interpolation in t."""
        t = np.clip(np.asarray(t, dtype=np.float64), 0, self.N - 1)
        return np.interp(t, np.arange(self.N), self.log_sigmas)

    def alpha_bar_at(self, t):
        """alpha_bar at (fractional) timestep t; t = -1 means alpha_bar = 1 (clean data)."""
        t = np.asarray(t, dtype=np.float64)
        ab = 1.0 / (1.0 + np.exp(2 * self.log_sigma_at(t)))
        return np.where(t < 0, 1.0, ab)

    def x0_from_eps(self, x: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """Tweedie / DDIM data prediction x0 = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t) (DDIM eq. 9), in x's dtype."""
        ab = torch.as_tensor(float(self.alpha_bar_at(t)), dtype=x.dtype, device=x.device)
        return (x - (1 - ab).sqrt() * eps) / ab.sqrt()

    def sigma_to_t(self, sigma):
        """Inverse of sigma(t): fractional timestep whose noise level is sigma."""
        log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
        return np.interp(log_sigma, self.log_sigmas, np.arange(self.N, dtype=np.float64))


def select_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "linspace",
                     offset: int = 0, rho: float = 7.0, endpoint: bool = True) -> np.ndarray:
    """Choose `steps` sampling timesteps, returned in decreasing order (float64).

    leading   (DDIM paper / diffusers default for DDIM): t = arange(steps) * (N // steps) + offset
    trailing  (Lin et al. 2024, "Common diffusion noise schedules are flawed"): starts at N-1
    linspace  (diffusers): round(linspace(0, N-1, steps))
    quadratic (DDIM, for CIFAR-10): t = (linspace(0, sqrt(0.8 N), steps))^2
    logsnr    (DPM-Solver, recommended at low resolution): uniform in lambda between lambda(N-1)
              and lambda(0); fractional timesteps
    karras    (EDM, Karras et al. 2022 eq. 5): sigma_i = (smax^(1/rho) + i/(M-1) (smin^(1/rho)
              - smax^(1/rho)))^rho with rho = 7; fractional timesteps

    endpoint (linspace, quadratic, logsnr, karras): True puts the last of the `steps` evaluations at the
    clean end of the grid (t = 0, or sigma_min for karras), as the DDIM and EDM papers do. False lays
    out steps + 1 grid points and drops the clean end, as DPM-Solver does (M steps between M + 1
    points, the model is never evaluated at the last one) and as diffusers' DPMSolverMultistepScheduler
    does with linspace; the sampler's final update then jumps from the lowest evaluated t to sigma = 0.
    At few steps this matters: with logsnr and endpoint=True the last evaluation sits at sigma ~ 0.01,
    where x is already clean, so one of the M evaluations is nearly wasted.
    leading and trailing define their own end (t = offset, resp. t = N/steps - 1) and ignore it.
    """
    N = schedule.N
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if steps > N:
        raise ValueError(f"steps must be <= N = {N} (got {steps})")
    M = steps if endpoint else steps + 1         # grid points; without the endpoint the clean end is dropped
    if spacing == "leading":
        ts = np.arange(steps) * (N // steps) + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(N, 0, -N / steps)) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, N - 1, M))
    elif spacing == "quadratic":
        ts = np.round(np.linspace(0, math.sqrt(N * 0.8), M) ** 2)
    elif spacing == "logsnr":
        lam = np.linspace(schedule.lambdas[-1], schedule.lambdas[0], M)
        ts = schedule.sigma_to_t(np.exp(-lam)) if M > 1 else np.array([N - 1.0])
    elif spacing == "karras":
        if M == 1:
            ts = np.array([N - 1.0])
        else:
            ramp = np.linspace(0, 1, M)
            smin, smax = schedule.sigma_min, schedule.sigma_max
            sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
            ts = schedule.sigma_to_t(sig)
    else:
        raise ValueError(f"unknown timestep spacing '{spacing}' (choose from {', '.join(SPACINGS)})")
    ts = np.sort(np.clip(np.asarray(ts, dtype=np.float64), 0, N - 1))[::-1]
    if not endpoint and spacing not in ("leading", "trailing"):
        ts = ts[:steps]                          # drop the clean end of the steps + 1 grid
    return ts.copy()
