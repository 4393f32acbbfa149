"""The Analytic-DPM variance of a reverse step (Bao, Li, Zhu, Zhang, ICLR 2022, arXiv 2201.06503).

Indexing. Our model timesteps are t = 0 .. N-1, the paper's n = t + 1; a jump goes from t to s < t,
and s = -1 is clean data (alpha_bar = 1). With ab = alpha_bar, bb = 1 - ab, the jump's
beta_{t|s} = 1 - ab_t / ab_s and the DDPM posterior variance beta_tilde = beta_{t|s} bb_s / bb_t.

The reverse step t -> s of the DDIM family (DDPM: lam2 = beta_tilde, DDIM: lam2 = eta^2 beta_tilde)

    x_s = sqrt(ab_s) x0_hat + sqrt(bb_s - lam2) eps_hat + sigma z

keeps its mean; Analytic-DPM only chooses sigma^2. Theorem 1 (optimal variance, eq. 7, written for a jump
as in Sec. 4 of the paper) with Gamma_t = E ||eps_theta(x_t, t)||^2 / d:

    sigma*^2 = lam2 + (sqrt(bb_t / alpha_{t|s}) - sqrt(bb_s - lam2))^2 (1 - Gamma_t)
             = lam2 + (sqrt(ab_s) - sqrt((bb_s - lam2) ab_t / bb_t))^2 * (bb_t / ab_t)(1 - Gamma_t)

where (bb_t / ab_t)(1 - Gamma_t) = E tr Cov[x_0 | x_t] / d. Theorem 2 bounds sigma*^2 between lam2
(Gamma_t <= 1) and two upper bounds, (bb_t / ab_t)(1 - Gamma_t) <= bb_t / ab_t (Gamma_t >= 0) and, for data
in [a, b]^d, <= ((b - a) / 2)^2; the estimate is clipped to those bounds, as the official code does
(clip to [0, 1] for images in [-1, 1]). For DDPM this is sigma^2 = beta_tilde + (ab_s beta_{t|s}^2 / bb_t^2) *
clip((bb_t / ab_t)(1 - Gamma_t), 0, 1).

`AnalyticVariance` is that rule for a Gamma estimated once per model (`fewstep.strategies.variance.gamma`);
`FixedVariance` gives the fixed rules the same interface (for likelihood bounds).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ...schedule import NoiseSchedule
from .gamma import GammaMismatch
from .trajectory import dp_trajectory


def analytic_sigma2(ab_t, ab_s, lam2, gamma_t, data_range=(-1.0, 1.0)):
    """Theorem 1 (general lam2) with the estimate clipped to Theorem 2's bounds; works on numpy arrays.

    sigma^2 = lam2 + (sqrt(ab_s) - sqrt((bb_s - lam2) ab_t / bb_t))^2 * clip((bb_t/ab_t)(1 - Gamma_t), 0, upper),
    upper = min(bb_t / ab_t, ((b - a)/2)^2) for data in [a, b] (data_range None: unbounded data).
    """
    ab_t, ab_s, lam2, gamma_t = (np.asarray(v, dtype=np.float64) for v in (ab_t, ab_s, lam2, gamma_t))
    bb_t, bb_s = 1.0 - ab_t, 1.0 - ab_s
    cov_x0 = bb_t / ab_t * (1.0 - gamma_t)                                  # E tr Cov[x_0 | x_t] / d
    upper = bb_t / ab_t
    if data_range is not None:
        a, b = data_range
        upper = np.minimum(upper, ((b - a) / 2.0) ** 2)
    cov_x0 = np.clip(cov_x0, 0.0, upper)
    coef = (np.sqrt(ab_s) - np.sqrt(np.maximum(bb_s - lam2, 0.0) * ab_t / bb_t)) ** 2
    return lam2 + coef * cov_x0


def pixel_cap2(clip_pixel: float) -> float:
    """Variance cap of the step that outputs x_1 (official code): sigma <= clip_pixel * 2/255 * sqrt(pi/2)."""
    return (clip_pixel * 2.0 / 255.0 * math.sqrt(math.pi / 2.0)) ** 2


def _check_jump(t: float, s: float, lam2: float, N: int, ab_s: float):
    if not (0 <= t <= N - 1 and -1 <= s < t):
        raise ValueError(f"variance rule needs timesteps -1 <= s < t <= {N - 1} (got t={t}, s={s})")
    if not (0 <= lam2 <= (1.0 - ab_s) * (1 + 1e-9) + 1e-15):
        raise ValueError(f"lam2 must lie in [0, 1 - alpha_bar_s = {1 - ab_s:.3g}] (got {lam2})")


class AnalyticVariance:
    """rule(t, s, lam2) -> sigma^2: the Analytic-DPM variance of the jump t -> s.

    gamma: Gamma at `timesteps` (default 0..N-1); other (fractional) timesteps interpolate linearly.
    clip_pixel: cap sigma at the step whose target is s = 0 (the paper's x_1), as the official FID runs
    do (2 for DDPM, 1 for DDIM); None for no cap. On the jump to data (s = -1) the rule returns the
    decoder variance E tr Cov[x_0 | x_t] / d (the samplers add no noise there).
    """

    def __init__(self, schedule: NoiseSchedule, gamma, timesteps=None, clip_pixel: Optional[float] = None,
                 data_range=(-1.0, 1.0), model_id: Optional[str] = None, path: Optional[str] = None):
        self.schedule = schedule
        self.gamma = np.asarray(gamma, dtype=np.float64)
        self.timesteps = (np.arange(schedule.N) if timesteps is None else np.asarray(timesteps)).astype(np.float64)
        if self.gamma.shape != self.timesteps.shape or len(self.gamma) == 0:
            raise ValueError(f"gamma ({self.gamma.shape}) and timesteps ({self.timesteps.shape}) must match")
        order = np.argsort(self.timesteps)                     # np.interp needs increasing timesteps
        self.timesteps, self.gamma = self.timesteps[order], self.gamma[order]
        if np.any(np.diff(self.timesteps) == 0):
            raise ValueError("gamma timesteps must be distinct")
        if clip_pixel is not None and not clip_pixel > 0:
            raise ValueError(f"clip_pixel must be > 0 or None (got {clip_pixel})")
        self.clip_pixel = clip_pixel
        self.data_range = None if data_range is None else tuple(float(v) for v in data_range)
        self.model_id, self.path = model_id, path

    def gamma_at(self, t):
        return np.interp(np.asarray(t, dtype=np.float64), self.timesteps, self.gamma)

    def gamma_full(self) -> np.ndarray:
        """Gamma on every integer timestep 0..N-1 (interpolated where it was not estimated)."""
        return self.gamma_at(np.arange(self.schedule.N))

    def uncapped(self) -> "AnalyticVariance":
        """The same rule without the last-step cap (for likelihood bounds)."""
        return AnalyticVariance(self.schedule, self.gamma, self.timesteps, None, self.data_range, self.model_id,
                                self.path)

    def __call__(self, t: float, s: float, lam2: float) -> float:
        t, s, lam2 = float(t), float(s), float(lam2)
        ab_t, ab_s = float(self.schedule.alpha_bar_at(t)), float(self.schedule.alpha_bar_at(s))
        _check_jump(t, s, lam2, self.schedule.N, ab_s)
        sigma2 = float(analytic_sigma2(ab_t, ab_s, lam2, self.gamma_at(t), self.data_range))
        if self.clip_pixel is not None and -0.5 < s < 0.5:  # the step that outputs x_1 (paper): s rounds to 0
            sigma2 = min(sigma2, pixel_cap2(self.clip_pixel))
        return sigma2

    @property
    def complete(self) -> bool:
        """Whether Gamma was estimated at every timestep 0..N-1 (no interpolation)."""
        return len(self.timesteps) == self.schedule.N and bool(np.all(self.timesteps == np.arange(self.schedule.N)))

    def require_complete(self, command: str = "python run.py task=gamma") -> None:
        """Refuse (GammaMismatch, one line naming `command` with task.timesteps=all) a Gamma that was not
        estimated at every timestep: the optimal trajectory needs all of them (see dp_timesteps)."""
        if not self.complete:
            raise GammaMismatch(f"sampler.timesteps=analytic_dp needs Gamma estimated at every timestep; "
                                f"{self.path or 'this Gamma'} has {len(self.timesteps)} of {self.schedule.N} (the rest "
                                f"interpolated, which the dynamic programme would exploit): estimate one with "
                                f"`{command} task.timesteps=all`")

    def dp_timesteps(self, K: int) -> np.ndarray:
        """Decreasing K model timesteps from N-1 to 0 minimising the Analytic-DPM bound (see dp_trajectory).

        Needs Gamma estimated at every timestep: the programme picks jumps by log(1 - beta_{t|s} Gamma_t / bb_t),
        and on interpolated values it follows the interpolation's error (at small t, where Gamma rises
        steeply, and near Gamma = 1) to trajectories whose true bound is worse than even steps."""
        self.require_complete()
        return dp_trajectory(self.gamma_full(), self.schedule, K)

    def __repr__(self):
        return (f"AnalyticVariance(model={self.model_id}, N={self.schedule.N}, clip_pixel={self.clip_pixel}, "
                f"path={self.path})")


class FixedVariance:
    """The fixed rules as variance rules (for likelihood bounds): 'beta' -> beta_{t|s} (Ho et al.'s upper
    bound; on the jump to data 1 - ab_t, i.e. sigma_1^2 = beta_1), 'lam2' -> lam2 (beta_tilde for DDPM,
    eta^2 beta_tilde for DDIM)."""

    KINDS = ("beta", "lam2")

    def __init__(self, schedule: NoiseSchedule, kind: str = "lam2"):
        if kind not in self.KINDS:
            raise ValueError(f"unknown fixed variance '{kind}' (choose from {', '.join(self.KINDS)})")
        self.schedule, self.kind = schedule, kind

    def __call__(self, t: float, s: float, lam2: float) -> float:
        ab_t, ab_s = float(self.schedule.alpha_bar_at(t)), float(self.schedule.alpha_bar_at(s))
        _check_jump(float(t), float(s), float(lam2), self.schedule.N, ab_s)
        return 1.0 - ab_t / ab_s if self.kind == "beta" else float(lam2)

    def __repr__(self):
        return f"FixedVariance({self.kind})"
