"""Negative log-likelihood bound (bits/dim) of a K-step reverse process with a chosen variance rule.

For a trajectory T = t_1 > t_2 > ... > t_K (model timesteps) the variational bound is (Ho et al. 2020 eq. 5,
over a subsequence as in Analytic-DPM, Bao et al. 2022, eq. 3 / Sec. 4):

    -log p(x_0) <= KL(q(x_T | x_0) || N(0, I))                                       prior
                  + sum_{t -> s} E_q KL(q_lam(x_s | x_t, x_0) || p(x_s | x_t))          K - 1 transitions
                  - E_q log p(x_0 | x_{t_K})                                           decoder

q_lam(x_s | x_t, x_0) = N(sqrt(ab_s) x_0 + sqrt(bb_s - lam2) (x_t - sqrt(ab_t) x_0) / sqrt(bb_t), lam2 I) is the
forward posterior of the DDIM family (lam2 = eta^2 beta_tilde, eta = 1: DDPM); the reverse step is the same
Gaussian with x_0 replaced by x0_hat(x_t) and variance sigma2 = rule(t, s, lam2). Per dimension

    KL = 1/2 [log(sigma2 / lam2) + lam2 / sigma2 - 1] + c^2 ||x_0 - x0_hat||^2 / (2 d sigma2),
    c = sqrt(ab_s) - sqrt((bb_s - lam2) ab_t / bb_t).

Each term is estimated with its own draw x_t ~ q(x_t | x_0) (as the official code does), so a bound costs K
network calls per batch. Data point i draws its noise from its own generator, seeded from (seed, i) with i
its index in the split (samplers/noise.py), so a point's bound does not depend on the batch size, the batch
order or which other points are bounded with it. Decoder: images in [-1, 1] use the 256-bin discretized
Gaussian of Ho et al. (edge bins extend to +-inf); vector data (the GMM) use the continuous Gaussian density, so their
"bits/dim" is a bound on the differential entropy and may be negative. Result: bits/dim = nats / (d ln 2),
averaged over data points, with the standard error of that mean. The evaluate task also writes each
point's bound (and its index in the split) to nll_bpd.npz, so that two runs on the same points can be
compared pairwise (`paired_difference`; experiments/report.py nll does).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..config import ConfigError
from ..samplers.ddim import beta_tilde as _beta_tilde
from ..samplers.noise import SampleNoise

PER_POINT_FILE = "nll_bpd.npz"     # next to metrics.json: index (in the split) and bpd of every point
NLL_NOISE_STREAM = 1               # the x_t draws of point i: stream 1 of (seed, i), apart from the samplers' 0


def log_normal_interval(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, stable in both tails (a may be -inf, b +inf)."""
    flip = a > 0                       # use Phi(b) - Phi(a) = Phi(-a) - Phi(-b) to stay in the lower tail
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    l_hi, l_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return l_hi + torch.log1p(-torch.exp(l_lo - l_hi).clamp(max=1.0 - 1e-16))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, var: float, bins: int = 256):
    """log P(x) per element for x on the grid of `bins` levels in [-1, 1] (Ho et al. 2020, Sec. 3.3)."""
    half = 1.0 / (bins - 1)
    std = math.sqrt(var)
    a = torch.where(x <= -1.0 + 1e-3 * half, torch.full_like(x, -math.inf), (x - half - mean) / std)
    b = torch.where(x >= 1.0 - 1e-3 * half, torch.full_like(x, math.inf), (x + half - mean) / std)
    return log_normal_interval(a, b)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def decoder_variance(decoder_var, schedule, t_last: float, rule) -> float:
    """Variance of p(x_0 | x_{t_last}): 'clipped' (beta_tilde of the jump 1 -> 0), 'rule', or a number."""
    if isinstance(decoder_var, str):
        if decoder_var == "clipped":
            ab0, ab1 = float(schedule.alpha_bar_at(0)), float(schedule.alpha_bar_at(1))
            return _beta_tilde(ab1, ab0)
        if decoder_var == "rule":
            v = float(rule(float(t_last), -1.0, 0.0))
            if not v > 0:
                raise ValueError(f"decoder_var=rule: {rule} gives variance {v} on the jump to data; "
                                 f"use decoder_var=clipped or a number")
            return v
        raise ValueError(f"decoder_var must be clipped, rule or a number > 0 (got '{decoder_var}')")
    v = float(decoder_var)
    if not v > 0:
        raise ValueError(f"decoder_var must be clipped, rule or a number > 0 (got {v})")
    return v


def check_trajectory(timesteps, N: int) -> np.ndarray:
    ts = np.asarray(timesteps, dtype=np.float64).reshape(-1)
    if ts.size < 1 or ts.min() < 0 or ts.max() > N - 1 or np.any(np.diff(ts) >= 0):
        raise ValueError(f"timesteps must be strictly decreasing within [0, {N - 1}] (got {ts.tolist()})")
    return ts


@torch.no_grad()
def nll_bpd(model, x0_batches: Iterable[torch.Tensor], schedule, timesteps, sigma2_rule, *,
            return_terms: bool = False, **kw):
    """Variational bound in bits/dim over the data points of `x0_batches`: (mean, stderr) [, terms].

    Arguments as `nll_points`; terms (return_terms=True): mean bits/dim of prior, each transition, decoder.
    """
    v, tm = nll_points(model, x0_batches, schedule, timesteps, sigma2_rule, **kw)
    mean_bpd, stderr = mean_and_stderr(v)
    if return_terms:
        return mean_bpd, stderr, {"prior": float(tm[0]), "transitions": tm[1:-1].tolist(), "decoder": float(tm[-1])}
    return mean_bpd, stderr


def mean_and_stderr(v: np.ndarray):
    """Mean and standard error (sample s.d. / sqrt(n); inf for one point) of per-point values."""
    v = np.asarray(v, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("inf")


def paired_difference(index_a, bpd_a, index_b, bpd_b):
    """Mean and standard error of bpd_a - bpd_b over the data points both runs bounded (matched by their
    index in the split): the between-image spread cancels, so two bounds on the same images are compared
    far more precisely than their own standard errors suggest. -> (mean, stderr, number of shared points)."""
    a = dict(zip(np.asarray(index_a).tolist(), np.asarray(bpd_a, dtype=np.float64).tolist()))
    b = dict(zip(np.asarray(index_b).tolist(), np.asarray(bpd_b, dtype=np.float64).tolist()))
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise ValueError("the two NLL runs share no data points")
    mean, se = mean_and_stderr(np.array([a[i] - b[i] for i in shared]))
    return mean, se, len(shared)


@torch.no_grad()
def nll_points(model, x0_batches: Iterable[torch.Tensor], schedule, timesteps, sigma2_rule, *, eta: float = 1.0,
               decoder_var="clipped", bins: Optional[int] = 256, clip_x0: bool = False, seed: int = 0,
               indices: Optional[Sequence[int]] = None, progress: bool = False):
    """The variational bound of each data point of `x0_batches`, in bits/dim: (per-point array in batch order,
    mean bits/dim of each term: prior, transitions, decoder).

    model: eps-predictor model(x, t); timesteps: decreasing trajectory t_1 > ... > t_K (t_1 should be N-1);
    sigma2_rule(t, s, lam2) -> sigma2: the reverse variance of jump t -> s (FixedVariance / AnalyticVariance);
    eta: lam2 = eta^2 beta_tilde (1 = DDPM; must be > 0); decoder_var: see `decoder_variance`;
    bins: 256 for images in [-1, 1] (discretized decoder), None for the continuous Gaussian density;
    clip_x0: clamp x0_hat to [-1, 1]; progress: a bar over the network calls (with a total when indices are
    given); seed, indices: the x_t draws of the n-th point (in batch order) come from its own generator seeded
    from (seed, indices[n]) (indices default 0, 1, ...; pass each point's index in the split). The same seed
    gives every rule the same noise on the same point.
    """
    N = schedule.N
    ts = check_trajectory(timesteps, N)
    if not eta > 0:
        raise ValueError(f"the likelihood bound needs a stochastic process, eta > 0 (got {eta}): with lam2 = 0 "
                         f"the forward posterior is a point mass and every transition KL is infinite")
    if bins is not None and int(bins) < 2:
        raise ValueError(f"bins must be >= 2 or None (got {bins})")
    ab = lambda t: float(schedule.alpha_bar_at(t))  # noqa: E731
    jumps = list(zip(ts[:-1], ts[1:]))
    plan = []                                              # (t, s, lam2, sigma2, c) of each transition
    for t, s in jumps:
        ab_t, ab_s = ab(t), ab(s)
        lam2 = eta ** 2 * _beta_tilde(ab_t, ab_s)
        sigma2 = float(sigma2_rule(float(t), float(s), lam2))
        if not sigma2 > 0:
            raise ValueError(f"variance rule {sigma2_rule} gives sigma2 = {sigma2} on the jump {t:g} -> {s:g}; "
                             f"the bound needs sigma2 > 0")
        c = math.sqrt(ab_s) - math.sqrt(max(1.0 - ab_s - lam2, 0.0) * ab_t / (1.0 - ab_t))
        plan.append((float(t), float(s), lam2, sigma2, c))
    var0 = decoder_variance(decoder_var, schedule, float(ts[-1]), sigma2_rule)

    def x0_hat(x0, t, noise):
        eps = noise().to(x0.dtype)
        a = ab(t)
        x_t = math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps
        e = model(x_t, float(t)).to(torch.float64)
        x0h = (x_t.to(torch.float64) - math.sqrt(1.0 - a) * e) / math.sqrt(a)
        return x0h.clamp(-1.0, 1.0) if clip_x0 else x0h

    per_point, term_sums, n = [], np.zeros(len(jumps) + 2), 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = None if indices is None else len(indices) * len(ts)       # network calls, one per term and point
        bar = tqdm(desc="NLL", total=total, unit="call", unit_scale=True, dynamic_ncols=True)
    for x0 in x0_batches:
        B, d = x0.shape[0], x0[0].numel()
        idx = range(n, n + B) if indices is None else [int(i) for i in indices[n: n + B]]
        if len(idx) != B:
            raise ValueError(f"nll_points: {len(indices)} indices, fewer than the data points")
        noise = SampleNoise(seed, idx, x0.shape[1:], device=x0.device, stream=NLL_NOISE_STREAM)
        x64 = x0.to(torch.float64)
        terms = []
        a_T = ab(ts[0])                                  # prior: KL(N(sqrt(ab_T) x_0, bb_T) || N(0, 1))
        terms.append(0.5 * (d * ((1 - a_T) - 1 - math.log(1 - a_T)) + a_T * x64.flatten(1).pow(2).sum(1)))
        for t, s, lam2, sigma2, c in plan:
            err2 = (x64 - x0_hat(x0, t, noise)).flatten(1).pow(2).sum(1)
            if bar is not None:
                bar.update(B)
            terms.append(0.5 * d * (math.log(sigma2 / lam2) + lam2 / sigma2 - 1.0) + c * c * err2 / (2 * sigma2))
        mean = x0_hat(x0, ts[-1], noise)
        ll = (discretized_gaussian_log_likelihood(x64, mean, var0, int(bins)) if bins is not None
              else gaussian_log_likelihood(x64, mean, var0))
        terms.append(-ll.flatten(1).sum(1))
        T = torch.stack(terms, 1) / (d * math.log(2.0))   # B x (K + 1) bits/dim
        per_point.append(T.sum(1).cpu())
        term_sums += T.sum(0).cpu().numpy()
        n += B
        if bar is not None:
            bar.update(B)                                # the decoder term's call
    if bar is not None:
        bar.close()
    if n == 0:
        raise ValueError("nll_bpd got no data")
    if indices is not None and n != len(indices):
        raise ValueError(f"nll_points: {len(indices)} indices for {n} data points")
    return torch.cat(per_point).numpy(), term_sums / n


# ============================================================================ config wiring

def nll_rule(cfg_variance, cfg_sampler, schedule, variance=None):
    """(sigma2_rule, eta) of the configured process: ddpm (eta = 1, var_type beta | beta_tilde) or ddim
    (eta = sampler.eta); variance=analytic -> the Analytic-DPM rule without the last-step cap."""
    from ..strategies.variance import FixedVariance

    name = cfg_sampler.name
    if name not in ("ddpm", "ddim"):
        raise ConfigError(f"metrics=nll bounds the likelihood of the ddpm / ddim reverse process; use sampler=ddpm "
                          f"(or sampler=ddim with sampler.eta > 0), not sampler={name}")
    eta = 1.0 if name == "ddpm" else float(cfg_sampler.eta)
    if not eta > 0:
        raise ConfigError("metrics=nll needs a stochastic process: sampler=ddim with sampler.eta > 0, or sampler=ddpm")
    if cfg_variance.name == "analytic":
        if variance is None:
            raise ConfigError("metrics=nll with variance=analytic needs the Analytic-DPM rule (build_variance)")
        return variance.uncapped(), eta
    kind = "beta" if name == "ddpm" and cfg_sampler.var_type == "beta" else "lam2"
    return FixedVariance(schedule, kind), eta


def _auto(value, default):
    return default if value is None or (isinstance(value, str) and value == "auto") else value


def evaluate_nll(cfg, model, variance=None, data: Optional[torch.Tensor] = None, device=None):
    """metrics=nll for the evaluate task: the bound over cfg.metrics.n_data points of cfg.metrics.split,
    along the sampler's trajectory. Returns ({nll_bpd, nll_bpd_se, nll_n, nll_steps},
    {index: each point's index in the split, bpd: its bound in bits/dim}), the second for `PER_POINT_FILE`."""
    from ..build import explicit_timesteps
    from ..samplers import sampler_timesteps

    mc = cfg.metrics
    rule, eta = nll_rule(cfg.variance, cfg.sampler, model.schedule, variance)
    decoder_var = mc.decoder_var
    ts = sampler_timesteps(cfg.sampler, model.schedule, explicit_timesteps(cfg.sampler, variance))
    n_data = mc.n_data
    if n_data is not None and (isinstance(n_data, bool) or int(n_data) < 1):
        raise ConfigError(f"metrics.n_data must be >= 1 or null (got {n_data})")
    bs = int(mc.batch_size)       # conf/metrics/nll.yaml: ${batch_size}
    seed = int(mc.seed)           # ${seed}
    if data is None:
        from ..data import load_dataset

        data = load_dataset(cfg.dataset, mc.split)
    index = torch.arange(len(data))
    if n_data is not None and int(n_data) < len(data):
        index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: int(n_data)]
        data = data[index]
    image = data.ndim == 4
    bins = _auto(mc.bins, 256 if image else None)
    clip_x0 = bool(_auto(mc.clip_x0, image))
    device = device if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = (data[i: i + bs].to(device) for i in range(0, len(data), bs))
    v, _ = nll_points(model, batches, model.schedule, ts, rule, eta=eta, decoder_var=decoder_var,
                      bins=None if bins is None else int(bins), clip_x0=clip_x0, seed=seed,
                      indices=index.tolist(), progress=True)
    mean, se = mean_and_stderr(v)
    return ({"nll_bpd": mean, "nll_bpd_se": se, "nll_n": int(len(data)), "nll_steps": int(len(ts))},
            {"index": index.numpy().astype(np.int64), "bpd": v})
