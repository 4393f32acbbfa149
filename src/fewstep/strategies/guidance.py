"""Classifier-free guidance (Ho & Salimans 2022), a denoiser-level strategy.

With a class-conditional network trained with label dropout (the null class stands for "no label"),

    eps = eps_u + w (eps_c - eps_u),     eps_c = eps(x_t, t, y),  eps_u = eps(x_t, t, null)

w = 1 is the conditional model, w = 0 the unconditional one, w > 1 trades diversity for fidelity. Both
rows go through the network as one batched call ([x; x] with labels [y; null]: conditional rows first).

Options:

* interval = [t_lo, t_hi] (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves
  sample and distribution quality in diffusion models"): guidance only for model timesteps
  t_lo <= t <= t_hi; outside, the conditional eps alone, and only the conditional row is computed. The
  paper's finding: guidance at high noise levels costs diversity and at low ones does little, so a middle
  window keeps most of the gain at a better FID; a narrower window also saves network rows.
* rescale = phi (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
  eq. 15-16): the guided prediction's per-sample standard deviation is matched to the conditional one's,
  x_rescaled = x_cfg * std(x_c) / std(x_cfg), then x = phi x_rescaled + (1 - phi) x_cfg. It counters the
  over-exposure of large scales. Done in x0 space (the data prediction; x0 = (x_t - sqrt(1 - ab) eps) /
  sqrt(ab) is affine in eps per sample, so the rescaled x0 maps back to one eps); phi = 0 is plain CFG.

w = 1 and w = 0 compute one row only (the conditional or the unconditional one), so they equal the
conditional and the unconditional model exactly, and cost what one network call costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..config import ConfigError, check

GUIDANCE = ("none", "cfg")


@dataclass(frozen=True)
class Guidance:
    scale: float
    interval: Optional[Tuple[float, float]] = None
    rescale: float = 0.0

    def rows_at(self, t: float) -> str:
        """Which rows a call at timestep t computes: "cond", "uncond" or "both"."""
        if self.interval is not None and not self.interval[0] <= float(t) <= self.interval[1]:
            return "cond"
        if self.scale == 1.0:
            return "cond"
        if self.scale == 0.0 and self.rescale == 0.0:
            return "uncond"
        return "both"

    def combine(self, eps_c: torch.Tensor, eps_u: torch.Tensor, x: torch.Tensor, t: float, schedule) -> torch.Tensor:
        """The guided eps from the two rows' predictions at the state x_t."""
        eps = eps_u + self.scale * (eps_c - eps_u)
        if self.rescale == 0.0:
            return eps
        x0_c, x0 = schedule.x0_from_eps(x, t, eps_c), schedule.x0_from_eps(x, t, eps)
        dims = tuple(range(1, x.ndim))
        ratio = x0_c.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True).clamp_min(1e-12)
        x0 = self.rescale * (x0 * ratio) + (1.0 - self.rescale) * x0
        ab = float(schedule.alpha_bar_at(t))
        return (x - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)


def validate_guidance_cfg(cfg, n_train: int) -> None:
    """One-line ConfigError for a bad guidance config (the config alone decides these)."""
    name = cfg.name
    check(name in GUIDANCE, f"unknown guidance '{name}' (choose from {', '.join(GUIDANCE)})")
    if name == "none":
        return
    w = cfg.scale
    check(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
          f"guidance.scale must be a finite number >= 0 (got {w!r})")
    phi = cfg.rescale
    check(isinstance(phi, (int, float)) and not isinstance(phi, bool) and 0 <= phi <= 1,
          f"guidance.rescale must be a number in [0, 1] (got {phi!r})")
    iv = cfg.interval
    if iv is not None:
        ok = hasattr(iv, "__len__") and len(iv) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             for v in iv)
        check(ok and 0 <= iv[0] <= iv[1] <= n_train - 1,
              f"guidance.interval must be null or [t_lo, t_hi] with 0 <= t_lo <= t_hi <= {n_train - 1} (got {iv})")


def classifier_free(*, scale, interval, rescale) -> Guidance:
    """guidance=cfg (conf/guidance/cfg.yaml) -> a Guidance."""
    return Guidance(scale=float(scale), interval=None if interval is None else (float(interval[0]), float(interval[1])),
                    rescale=float(rescale))


def build_guidance(cfg) -> Optional[Guidance]:
    """A validated cfg.guidance (conf/guidance/*.yaml; its `_target_` is classifier_free above) -> a Guidance,
    or None for guidance=none."""
    from ..config import instantiate

    return instantiate(cfg)


def guidance_key(cfg) -> Optional[dict]:
    """What a guided eps depends on, for the files made with it (a Gamma estimate): None without guidance,
    else {scale, interval, rescale} as plain floats."""
    g = build_guidance(cfg)
    if g is None:
        return None
    return {"scale": g.scale, "interval": None if g.interval is None else list(g.interval), "rescale": g.rescale}


def require_conditional(num_classes: Optional[int], what: str) -> None:
    if num_classes is None:
        raise ConfigError(f"{what} needs a class-conditional network (backbone.config.num_class_embeds = classes "
                          f"+ 1, the last the null class); this backbone has no class embedding")
