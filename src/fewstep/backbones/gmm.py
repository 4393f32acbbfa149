"""A Gaussian mixture with closed-form eps(x, t): the exact model for tests and demos.

Data: x_0 ~ sum_k w_k N(mu_k, s_k^2 I) in R^d. Under x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps,
x_t ~ sum_k w_k N(sqrt(ab) mu_k, v_k I) with v_k = ab s_k^2 + 1 - ab, so the score is

    grad log p_t(x) = sum_k r_k(x) (sqrt(ab) mu_k - x) / v_k,   r_k = posterior responsibility,

and the optimal eps-prediction is eps*(x, t) = E[eps | x_t = x] = -sqrt(1 - ab) grad log p_t(x).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..schedule import NoiseSchedule


class GaussianMixture:
    """The data distribution; also gives exact moments for checking samplers."""

    def __init__(self, dim: int = 2, n_components: int = 8, radius: float = 0.7, std: float = 0.1,
                 seed: int = 0):
        g = np.random.default_rng(seed)
        if dim == 2:  # a ring: easy to look at
            ang = 2 * math.pi * np.arange(n_components) / n_components
            means = radius * np.stack([np.cos(ang), np.sin(ang)], 1)
        else:
            means = g.normal(size=(n_components, dim))
            means = radius * means / np.linalg.norm(means, axis=1, keepdims=True)
        self.means = torch.tensor(means, dtype=torch.float64)
        self.stds = torch.full((n_components,), float(std), dtype=torch.float64)
        self.weights = torch.full((n_components,), 1.0 / n_components, dtype=torch.float64)
        self.dim = dim

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float()

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> torch.Tensor:
        m = self.mean()
        c = sum(w * (torch.outer(mu, mu) + s ** 2 * torch.eye(self.dim, dtype=torch.float64))
                for w, mu, s in zip(self.weights, self.means, self.stds))
        return c - torch.outer(m, m)

    def log_prob(self, x: torch.Tensor, alpha_bar: float = 1.0) -> torch.Tensor:
        """log p_t(x) of the noised marginal at the given alpha_bar (1 = data)."""
        x = x.double()
        v = alpha_bar * self.stds ** 2 + 1 - alpha_bar                        # K
        diff = x[:, None, :] - math.sqrt(alpha_bar) * self.means[None]        # B K d
        logn = -0.5 * (diff ** 2).sum(-1) / v - 0.5 * self.dim * torch.log(2 * math.pi * v)
        return torch.logsumexp(torch.log(self.weights) + logn, dim=1)

    def eps(self, x: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """Exact E[eps | x_t = x]."""
        dtype = x.dtype
        x = x.double()
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1, 1, 1)  # B|1 x 1 x 1
        v = ab * self.stds[None, :, None] ** 2 + 1 - ab                          # B K 1
        mu = ab.sqrt() * self.means[None]                                        # B K d
        diff = x[:, None, :] - mu
        logn = -0.5 * (diff ** 2).sum(-1, keepdim=True) / v - 0.5 * self.dim * torch.log(2 * math.pi * v)
        r = torch.softmax(torch.log(self.weights)[None, :, None] + logn, dim=1)  # B K 1
        score = (r * (-diff) / v).sum(1)
        return (-(1 - ab[:, :, 0]).sqrt() * score).to(dtype)


class GMMExact(nn.Module):
    """Backbone whose output is the exact eps of a GaussianMixture; t may be fractional."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.register_buffer("_dummy", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = torch.as_tensor(self.schedule.alpha_bar_at(t.detach().cpu().double().numpy()), dtype=torch.float64)
        return self.mixture.eps(x, ab)
