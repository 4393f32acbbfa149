"""Backbone + parameterization -> eps(x, t) and x0(x, t), with NFE and cost accounting.

A `Denoiser` is what every sampler calls: ``model(x, t) -> eps`` with `t` a float
(fractional allowed) discrete timestep, shared by the batch. It converts the
backbone's output from its parameterization to eps:

    eps:  eps = f
    x0:   eps = (x - sqrt(ab) f) / sqrt(1 - ab)
    v:    eps = sqrt(ab) f + sqrt(1 - ab) x          (v = sqrt(ab) eps - sqrt(1 - ab) x0)

Strategies act below it: skip hooks live on the backbone adapter, a cache
strategy (DeepCache) replaces the backbone call. The denoiser counts every
network evaluation (NFE) and, per kind of call ("full", "partial@m"), its MACs.

A condition (the sampler hands it over untouched as extra_args: keyword tensors with one row per sample,
class_labels (B,) or the prompt embeddings encoder_hidden_states (B, L, D)) goes to the backbone as it is.
With a guidance strategy (strategies/guidance.py: classifier-free guidance) the denoiser computes the
conditional and unconditional rows in one batched call, conditional rows first, and returns the guided
eps. The unconditional row's condition is `null_cond` (per key, one row broadcast to the batch: the null
class, or the embedding of the negative / empty prompt); `null_label` k is null_cond {"class_labels": k}. `calls` counts network calls by kind (the NFE), `rows` the rows per sample they computed (2 for a
guided call, 1 otherwise): MACs per sample = sum over kinds of rows x MACs of one row.

Non-finite numbers stop a run where they appear: a call whose input x or network output is not finite
raises NonFiniteSamples naming the call and its timestep (a diverging sampler, an fp16 overflow), instead
of producing black images or failing later inside a metric.

`autocast` ("bf16" / "fp16", config key `autocast`) runs the network calls -- and only them -- under
torch.autocast; their output is cast back to x's dtype, so the sampler's arithmetic stays float32.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import nn

from .config import ConfigError
from .schedule import NoiseSchedule

PARAMETERIZATIONS = ("eps", "x0", "v")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteSamples(RuntimeError):
    """The samples (or the network's output on them) became inf / nan; the message names where."""


def check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteSamples(f"{what} is not finite (inf or nan): the sampler diverged or the network "
                               f"overflowed; try more steps, a smaller step option or autocast=null")


def autocast_dtype(name) -> Optional[torch.dtype]:
    """Config value of `autocast` -> dtype (None = off); one-line ConfigError otherwise."""
    if name in (None, "none", "null", False):
        return None
    if name not in AUTOCAST:
        raise ConfigError(f"autocast must be null, bf16 or fp16 (got {name})")
    return AUTOCAST[name]


class Denoiser(nn.Module):
    def __init__(self, backbone: nn.Module, schedule: NoiseSchedule, parameterization: str = "eps",
                 cache=None, autocast: Optional[str] = None, guidance=None, null_label: Optional[int] = None,
                 null_cond: Optional[dict] = None):
        super().__init__()
        if null_label is not None:
            null_cond = {"class_labels": torch.tensor(int(null_label)), **(null_cond or {})}
        if guidance is not None and not null_cond:
            raise ValueError("guidance needs the null condition of the network (its unconditional row: the null "
                             "class label or the negative prompt embedding)")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization '{parameterization}' (choose from {', '.join(PARAMETERIZATIONS)})")
        self.backbone = backbone
        self.schedule = schedule
        self.parameterization = parameterization
        self.cache = cache
        self.autocast = autocast_dtype(autocast)
        self.guidance, self.null_label, self.null_cond = guidance, null_label, dict(null_cond or {})
        self.calls: Counter = Counter()  # kind of backbone call -> number of batched calls
        self.rows: Counter = Counter()   # kind -> rows per sample computed by those calls

    # ------------------------------------------------------------------ bookkeeping
    @property
    def nfe(self) -> int:
        return sum(self.calls.values())

    def reset(self):
        """Start a new sampling run for a new batch: zero the counters, drop any cache."""
        self.calls, self.rows = Counter(), Counter()
        if self.cache is not None:
            self.cache.reset()

    # ------------------------------------------------------------------ model calls
    def _alpha_bar(self, t: float, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(float(self.schedule.alpha_bar_at(t)), dtype=like.dtype, device=like.device)

    def backbone_out(self, x: torch.Tensor, t, class_labels=None, rows: int = 1, **cond) -> torch.Tensor:
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
        if class_labels is not None:
            cond["class_labels"] = class_labels
        with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if self.cache is not None:
                out, kind = self.cache(self.backbone, x, tt, **cond)
            else:
                out, kind = self.backbone(x, tt, **cond), "full"
        self.calls[kind] += 1
        self.rows[kind] += rows
        return out

    def null_condition(self, cond: dict) -> dict:
        """The unconditional rows' condition for a batch with condition `cond` (same keys and shapes)."""
        missing = [k for k in cond if k not in self.null_cond]
        if missing:
            raise ValueError(f"guidance has no unconditional value of {', '.join(missing)}")
        return {k: self.null_cond[k].to(device=v.device, dtype=v.dtype).expand_as(v) for k, v in cond.items()}

    def forward(self, x: torch.Tensor, t, class_labels: Optional[torch.Tensor] = None, **cond) -> torch.Tensor:
        """eps_theta(x_t, t[, condition]): guided when a guidance strategy is set (a condition required then)."""
        call = f"network call {self.nfe + 1} (t = {float(t):.4g})"
        check_finite(x, f"the sample entering {call}")
        cond = {k: v for k, v in dict(cond, class_labels=class_labels).items() if v is not None}
        rows = "cond" if self.guidance is None else self.guidance.rows_at(t)
        if rows != "cond" and not cond:
            raise ValueError("guidance needs the condition (class_labels or encoder_hidden_states: the sampler's "
                             "extra_args)")
        if rows == "both":
            null = self.null_condition(cond)
            xx = torch.cat([x, x])
            both = {k: torch.cat([v, null[k]]) for k, v in cond.items()}
            self.backbone.cond_rows = x.shape[0]            # skip.rows=cond scales these rows only
            try:
                f = self.backbone_out(xx, t, rows=2, **both)
            finally:
                self.backbone.cond_rows = None
            check_finite(f, f"the network output of {call}")
            eps_c, eps_u = self._to_eps(xx, t, f).chunk(2)
            return self.guidance.combine(eps_c, eps_u, x, t, self.schedule)
        f = self.backbone_out(x, t, **(cond if rows == "cond" else self.null_condition(cond)))
        check_finite(f, f"the network output of {call}")
        return self._to_eps(x, t, f)

    def _to_eps(self, x: torch.Tensor, t, f: torch.Tensor) -> torch.Tensor:
        """The backbone's output f in its parameterization -> eps at the state x."""
        if f.shape[1] != x.shape[1]:  # learned-variance heads: keep the mean channels
            f = f[:, : x.shape[1]]
        f = f.to(x.dtype)
        if self.parameterization == "eps":
            return f
        ab = self._alpha_bar(t, x)
        if self.parameterization == "x0":
            return (x - ab.sqrt() * f) / (1 - ab).sqrt()
        return ab.sqrt() * f + (1 - ab).sqrt() * x

    eps = forward

    def x0(self, x: torch.Tensor, t, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tweedie / DDIM x0 prediction: (x - sqrt(1 - ab) eps) / sqrt(ab)."""
        if eps is None:
            eps = self(x, t)
        return self.schedule.x0_from_eps(x, t, eps)
