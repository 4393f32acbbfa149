"""Reverse-process variance rules: Analytic-DPM (Bao, Li, Zhu, Zhang, ICLR 2022, arXiv 2201.06503).

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

Gamma is estimated once per model by Monte Carlo over data (`estimate_gamma`, run by `task=gamma`) and
stored in a file keyed by the model's content hash (`model_id`), the dataset and M: a safetensors file
(`fewstep.safe_io`, nothing in it can run code when it is read) whose tensors are timesteps, gamma, stderr
and the running sums, and whose JSON metadata holds the key and the provenance.

Optimal trajectory (Sec. 4 / App.): with the optimal variances the K-step DDPM bound is, up to terms that
telescope, sum over jumps of (d/2) log(1 - beta_{t|s} Gamma_t / bb_t); `dp_trajectory` minimises it by
dynamic programming (least-cost K-node path from t = 0 to N-1), with the official code's treatment of the
unreliable tail where the estimated Gamma exceeds 1 (see `split_reliable`).
"""
from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..safe_io import load_tensors, save_tensors
from ..schedule import NoiseSchedule

GAMMA_FORMAT = 2              # 1: the earlier torch.save pickle (.pt), no longer read
GAMMA_KIND = "gamma"
GAMMA_SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"
CLIP_PIXEL_DEFAULT = {"ddpm": 2.0, "ddim": 1.0}  # official Analytic-DPM runs (CIFAR-10, linear schedule)
VARIANCES = ("fixed", "analytic")


class GammaMissing(ConfigError):
    """No Gamma file for this model; the message names the command that makes one."""


class GammaMismatch(ConfigError):
    """A Gamma file belongs to another model (or schedule)."""


# ============================================================================ model identity

def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def model_id(module: nn.Module) -> str:
    """Content hash of a network: sha1 over its state_dict tensors (shape, dtype, bytes), first 16 hex.

    Names are not hashed, so a wrapper with the same weights in the same order (UNetAdapter(unet) vs
    unet) has the same id. Parameter-free exact models (GMMExact) are identified by the tensors of the
    plain objects they hold as attributes (the mixture's means, stds, weights).
    """
    h = hashlib.sha1()
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(_tensor_bytes(t))
    for m in module.modules():
        for name in sorted(vars(m)):
            obj = vars(m)[name]
            if name.startswith("_") or isinstance(obj, (nn.Module, torch.Tensor)) or not hasattr(obj, "__dict__"):
                continue
            for key in sorted(vars(obj)):
                t = vars(obj)[key]
                if isinstance(t, torch.Tensor):
                    h.update(f"{type(obj).__name__}.{key}{tuple(t.shape)}{t.dtype}".encode())
                    h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


def schedule_id(schedule: NoiseSchedule) -> str:
    """Hash of alpha_bar: Gamma depends on the noise schedule as well as on the network."""
    return hashlib.sha1(np.ascontiguousarray(schedule.alpha_bar, dtype=np.float64).tobytes()).hexdigest()[:16]


# ============================================================================ Monte Carlo estimate of Gamma

@dataclass
class GammaStats:
    """Running sums of g = ||eps_theta(x_t, t)||^2 / d per timestep; Gamma_t = mean, with its standard error."""

    timesteps: np.ndarray
    sum: np.ndarray = None
    sumsq: np.ndarray = None
    count: int = 0

    def __post_init__(self):
        self.timesteps = np.asarray(self.timesteps, dtype=np.int64)
        n = len(self.timesteps)
        self.sum = np.zeros(n) if self.sum is None else np.asarray(self.sum, dtype=np.float64)
        self.sumsq = np.zeros(n) if self.sumsq is None else np.asarray(self.sumsq, dtype=np.float64)

    @property
    def gamma(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def stderr(self) -> np.ndarray:
        """Standard error of the mean, sqrt(sample variance / M)."""
        m = self.count
        if m < 2:
            return np.full(len(self.timesteps), np.inf)
        var = np.maximum(self.sumsq - self.sum ** 2 / m, 0.0) / (m - 1)
        return np.sqrt(var / m)

    def merge(self, other: "GammaStats") -> "GammaStats":
        if not np.array_equal(self.timesteps, other.timesteps):
            raise ValueError("cannot merge Gamma statistics over different timesteps")
        return GammaStats(self.timesteps, self.sum + other.sum, self.sumsq + other.sumsq, self.count + other.count)

    def all_reduce(self, device=None) -> "GammaStats":
        """Sum the statistics of all processes (torch.distributed); a no-op when it is not initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        n = len(self.timesteps)
        buf = torch.tensor(np.concatenate([self.sum, self.sumsq, [self.count]]), dtype=torch.float64, device=device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf = buf.cpu().numpy()
        return GammaStats(self.timesteps, buf[:n], buf[n: 2 * n], int(round(buf[2 * n])))

    def state_dict(self) -> dict:
        return {"timesteps": self.timesteps.copy(), "sum": self.sum.copy(), "sumsq": self.sumsq.copy(),
                "count": int(self.count)}

    @classmethod
    def from_state_dict(cls, d: dict) -> "GammaStats":
        return cls(np.asarray(d["timesteps"]), np.asarray(d["sum"]), np.asarray(d["sumsq"]), int(d["count"]))


def check_timesteps(timesteps, N: int) -> np.ndarray:
    """`all`/None -> 0..N-1; an int k -> every k-th timestep plus N-1; a list -> those (sorted, unique)."""
    if timesteps is None or (isinstance(timesteps, str) and timesteps == "all"):
        return np.arange(N, dtype=np.int64)
    if isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
        if timesteps < 1:
            raise ValueError(f"timesteps stride must be >= 1 (got {timesteps})")
        return np.unique(np.append(np.arange(0, N, int(timesteps)), N - 1)).astype(np.int64)
    if isinstance(timesteps, str):
        raise ValueError(f"timesteps must be 'all', a stride k >= 1 or a list of integers in [0, {N - 1}] "
                         f"(got '{timesteps}')")
    ts = np.asarray(list(timesteps))
    if ts.size == 0 or not np.all(np.mod(ts, 1) == 0) or ts.min() < 0 or ts.max() > N - 1:
        raise ValueError(f"timesteps must be integers in [0, {N - 1}] (got {list(timesteps)})")
    return np.unique(ts.astype(np.int64))


@torch.no_grad()
def estimate_gamma(model, x0_iter: Iterable[torch.Tensor], schedule: NoiseSchedule, timesteps=None,
                   generator: Optional[torch.Generator] = None, stats: Optional[GammaStats] = None,
                   callback: Optional[Callable[[GammaStats], None]] = None, progress: bool = False,
                   total: Optional[int] = None) -> GammaStats:
    """Monte Carlo estimate of Gamma_t = E_{x_0, eps} ||eps_theta(x_t, t)||^2 / d (Analytic-DPM eq. 8).

    model: eps-predictor `model(x, t) -> eps` (a Denoiser); x0_iter: batches of data x_0; one noise draw
    eps ~ N(0, I) per sample and timestep (from `generator`, a CPU torch.Generator), x_t = sqrt(ab_t) x_0 +
    sqrt(1 - ab_t) eps. Accumulates into `stats` (to continue an interrupted estimate) and calls
    `callback(stats)` after every batch (checkpointing). Returns GammaStats (gamma, stderr per timestep).
    """
    ts = check_timesteps(timesteps, schedule.N) if stats is None else stats.timesteps
    stats = GammaStats(ts) if stats is None else stats
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    ab = schedule.alpha_bar
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=None if total is None else total * len(ts), desc="Gamma", unit="call", dynamic_ncols=True)
    for x0 in x0_iter:
        g_sum = np.zeros(len(ts))
        g_sq = np.zeros(len(ts))
        for j, t in enumerate(ts):
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
            x_t = math.sqrt(ab[t]) * x0 + math.sqrt(1.0 - ab[t]) * eps
            g = model(x_t, float(t)).double().flatten(1).pow(2).mean(1)
            g_sum[j] = g.sum().item()
            g_sq[j] = g.pow(2).sum().item()
            if bar is not None:
                bar.update(1)
        stats.sum += g_sum
        stats.sumsq += g_sq
        stats.count += int(x0.shape[0])
        if bar is not None:
            bar.set_postfix(M=stats.count)
        if callback is not None:
            callback(stats)
    if bar is not None:
        bar.close()
    return stats


# ============================================================================ Gamma files

def gamma_filename(mid: str, dataset: str, M: int) -> str:
    return f"gamma_{mid}_{dataset}_M{int(M)}{GAMMA_SUFFIX}"


def save_gamma(path, stats: GammaStats, *, model_id: str, dataset: str, schedule: NoiseSchedule,
               pretrained=None, **extra) -> Path:
    """Write a Gamma file atomically (safetensors): tensors timesteps, gamma, stderr and the running sums
    stats_sum / stats_sumsq; JSON metadata the key (model, dataset, M, schedule) and `extra`."""
    tensors = {"timesteps": torch.as_tensor(stats.timesteps), "gamma": torch.as_tensor(stats.gamma),
               "stderr": torch.as_tensor(stats.stderr), "stats_sum": torch.as_tensor(stats.sum),
               "stats_sumsq": torch.as_tensor(stats.sumsq)}
    meta = {"format": GAMMA_FORMAT, "model_id": model_id, "pretrained": None if pretrained is None else str(pretrained),
            "dataset": str(dataset), "M": int(stats.count), "schedule_id": schedule_id(schedule), "N": schedule.N,
            "created": _dt.datetime.now().isoformat(timespec="seconds"), **extra}
    return save_tensors(path, tensors, GAMMA_KIND, meta)


def load_gamma(path, model_id: Optional[str] = None, schedule: Optional[NoiseSchedule] = None,
               command: Optional[str] = None) -> dict:
    """Read a Gamma file -> dict of its metadata, tensors (timesteps, gamma, stderr), `stats` (GammaStats
    state) and `path`; refuse one made for another model or noise schedule (one-line GammaMismatch), and
    anything that is not a safetensors Gamma file (a pickle of the earlier .pt format is never unpickled)."""
    path = Path(os.path.expanduser(str(path)))
    hint = f": estimate it with `{command}`" if command else ""
    if not path.is_file():
        raise GammaMissing(f"variance.gamma_path={path}: file not found{hint}")
    tensors, obj = load_tensors(path, GAMMA_KIND, f"re-estimate it with `{command or 'python run.py task=gamma'}`")
    if obj.get("format") != GAMMA_FORMAT or not {"timesteps", "gamma", "stderr"} <= set(tensors):
        raise GammaMismatch(f"{path} is not a fewstep Gamma file (format {GAMMA_FORMAT}){hint}")
    if model_id is not None and obj.get("model_id") != model_id:
        raise GammaMismatch(f"{path} holds Gamma of model {obj.get('model_id')} ({obj.get('pretrained')}, "
                            f"dataset {obj.get('dataset')}), not of this model {model_id}; refusing it{hint}")
    if schedule is not None and obj.get("schedule_id") != schedule_id(schedule):
        raise GammaMismatch(f"{path} holds Gamma for another noise schedule (N={obj.get('N')}) than this model's "
                            f"(N={schedule.N}){hint}")
    obj.update({k: tensors[k] for k in ("timesteps", "gamma", "stderr")})
    if "stats_sum" in tensors and "stats_sumsq" in tensors:
        obj["stats"] = {"timesteps": tensors["timesteps"].numpy(), "sum": tensors["stats_sum"].numpy(),
                        "sumsq": tensors["stats_sumsq"].numpy(), "count": int(obj["M"])}
    obj["path"] = str(path)
    return obj


def find_gamma(mid: str, dirs: Sequence, dataset: Optional[str] = None) -> Optional[Path]:
    """The Gamma file of model `mid` in the first folder that has one: same dataset first, then largest M.

    Only when no folder has one, a legacy gamma_<mid>_*.pt (pickle) is returned, for load_gamma to refuse
    with the command that makes a safe one (it is never unpickled).
    """
    for suffix in (GAMMA_SUFFIX, LEGACY_SUFFIX):
        for d in dirs:
            if not d or not os.path.isdir(os.path.expanduser(str(d))):
                continue
            files = [Path(f) for f in glob.glob(os.path.join(glob.escape(os.path.expanduser(str(d))),
                                                             f"gamma_{mid}_*{suffix}"))]
            if not files:
                continue

            def key(f: Path):
                stem = f.name[len(f"gamma_{mid}_"): -len(suffix)]
                ds, _, m = stem.rpartition("_M")
                return (ds == dataset, int(m) if m.isdigit() else -1, f.name)

            return max(files, key=key)
    return None


def gamma_command(cfg_variance) -> str:
    """The exact command that estimates Gamma for the configured model and dataset."""
    extra = []
    try:  # inside a Hydra run: repeat the user's dataset.* / backbone.* overrides too
        from hydra.core.hydra_config import HydraConfig

        extra = [o for o in HydraConfig.get().overrides.task
                 if o.split("=", 1)[0].lstrip("+~").startswith(("dataset.", "backbone."))]
    except Exception:
        pass
    parts = ["python run.py task=gamma"]
    for key, opt in (("dataset", "dataset"), ("backbone", "backbone"), ("pretrained", "backbone.pretrained")):
        v = cfg_variance.get(key, None) if cfg_variance is not None else None
        if v not in (None, "") and not any(o.split("=", 1)[0].lstrip("+~") == opt for o in extra):
            parts.append(f"{opt}={v}")
    return " ".join(parts + extra)


def _search_dirs(cfg_variance) -> list:
    dirs = list(cfg_variance.get("search_dirs", None) or [])
    return [os.path.expanduser(str(d)) for d in dirs if d not in (None, "")]


# ============================================================================ variance formulas

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

    def dp_timesteps(self, K: int) -> np.ndarray:
        """Decreasing K model timesteps from N-1 to 0 minimising the Analytic-DPM bound (see dp_trajectory)."""
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


# ============================================================================ optimal trajectory (DP)

def jump_cost(gamma: np.ndarray, schedule: NoiseSchedule, n: Optional[int] = None) -> np.ndarray:
    """C[s, t] = log(1 - beta_{t|s} Gamma_t / bb_t) for 0 <= s < t < n (inf elsewhere): the part of the
    K-step bound (in units of d/2) that depends on the trajectory, Analytic-DPM Sec. 4."""
    n = schedule.N if n is None else n
    ab = schedule.alpha_bar[:n]
    beta_ts = 1.0 - ab[None, :] / ab[:, None]                        # beta_{t|s}, rows s, columns t
    with np.errstate(divide="ignore", invalid="ignore"):
        C = np.log(1.0 - beta_ts * (np.asarray(gamma[:n]) / (1.0 - ab))[None, :])
    C[np.tril_indices(n)] = np.inf
    return C


def least_cost_path(C: np.ndarray, K: int) -> list:
    """Increasing K-node path 0 = p_1 < ... < p_K = n-1 minimising sum C[p_k, p_{k+1}] (dynamic programming)."""
    n = C.shape[0]
    if not (2 <= K <= n or K == n == 1):
        raise ValueError(f"a path from node 0 to node {n - 1} has 2..{n} nodes (got K={K})")
    if K == n:
        return list(range(n))
    cost = np.full((K + 1, n), np.inf)
    arg = np.full((K + 1, n), -1, dtype=np.int64)
    cost[1, 0] = 0.0
    for k in range(2, K + 1):
        tot = cost[k - 1][:, None] + C                                 # [s, t]
        arg[k] = np.argmin(tot, axis=0)
        cost[k] = tot[arg[k], np.arange(n)]
    path, t = [n - 1], n - 1
    for k in range(K, 1, -1):
        t = int(arg[k, t])
        path.append(t)
    return path[::-1]


def split_reliable(gamma: np.ndarray, K: int):
    """The official `_split`: Gamma <= 1 in theory, so from the first timestep where the estimate exceeds 1
    the tail is unreliable. num_bad = 2 x (length of that tail) timesteps at the top are left out of the DP
    and get K2 evenly spaced steps, the reliable head [0, N1) gets K1 = ceil((1 - 0.8 num_bad/N) K) DP steps.
    Returns (K1, N1, K2, num_bad). (Made total: num_bad <= N-1, and K = 2 with a tail gives K1 = K2 = 1.)"""
    N = len(gamma)
    above = np.nonzero(np.asarray(gamma) > 1.0)[0]
    num_bad = 0 if len(above) == 0 else min(2 * (N - int(above[0])), N - 1)
    N1 = N - num_bad
    K1 = math.ceil((1.0 - 0.8 * num_bad / N) * K)
    K2 = K - K1
    if K1 > N1:
        K1, K2 = N1, K - N1
    if K2 > num_bad:
        K2, K1 = num_bad, K - num_bad
    if num_bad > 0 and K2 == 0:
        K2, K1 = 1, K - 1
    return K1, N1, K2, num_bad


def dp_trajectory(gamma: np.ndarray, schedule: NoiseSchedule, K: int) -> np.ndarray:
    """Analytic-DPM optimal K-step trajectory, decreasing model timesteps from N-1 to 0 (official `_dp_seg`).

    DP over the reliable head [0, N1) with cost `jump_cost`, then K2 evenly spaced steps in the unreliable
    tail (N1, N-1] (round(N - k num_bad / K2) in the paper's indices, k = 0..K2-1).
    """
    N = schedule.N
    gamma = np.asarray(gamma, dtype=np.float64)
    if gamma.shape != (N,):
        raise ValueError(f"dp_trajectory needs Gamma on all N = {N} timesteps (got shape {gamma.shape})")
    if not isinstance(K, (int, np.integer)) or not 2 <= K <= N:
        raise ValueError(f"analytic_dp needs 2 <= steps <= N = {N} (got {K})")
    if K == N:
        return np.arange(N - 1, -1, -1, dtype=np.float64)
    K1, N1, K2, num_bad = split_reliable(gamma, K)
    head = least_cost_path(jump_cost(gamma, schedule, N1), K1) if K1 > 1 else [0]
    tail = [round(N - num_bad / K2 * k) - 1 for k in range(K2)][::-1] if K2 > 0 else []
    path = head + tail
    assert len(path) == K and path[0] == 0 and path[-1] == N - 1 and all(np.diff(path) > 0), path
    return np.asarray(path[::-1], dtype=np.float64)


def trajectory_cost(gamma: np.ndarray, schedule: NoiseSchedule, ts) -> float:
    """Sum of jump_cost along a trajectory (any order): what dp_trajectory minimises."""
    ts = np.sort(np.asarray(ts, dtype=np.int64))
    ab = schedule.alpha_bar
    g = np.asarray(gamma, dtype=np.float64)
    return float(sum(math.log(1.0 - (1.0 - ab[t] / ab[s]) * g[t] / (1.0 - ab[t])) for s, t in zip(ts[:-1], ts[1:])))


# ============================================================================ config -> rule

def _clip_pixel(value, cfg_sampler) -> Optional[float]:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"variance.clip_pixel must be auto, null or a number > 0 (got '{value}')")
        name = cfg_sampler.get("name") if cfg_sampler is not None else None
        return CLIP_PIXEL_DEFAULT.get(name)
    value = float(value)
    if not value > 0:
        raise ValueError(f"variance.clip_pixel must be auto, null or a number > 0 (got {value})")
    return value


def _data_range(value):
    if value is None:
        return None
    a, b = (float(v) for v in value)
    if not b > a:
        raise ValueError(f"variance.data_range must be [a, b] with a < b, or null (got {list(value)})")
    return (a, b)


def validate_variance_cfg(cfg_variance, cfg_sampler=None) -> None:
    """Cheap checks before anything heavy is built; one-line ValueError."""
    name = cfg_variance.get("name")
    if name not in VARIANCES:
        raise ValueError(f"unknown variance '{name}' (choose from {', '.join(VARIANCES)})")
    if name == "analytic":
        _clip_pixel(cfg_variance.get("clip_pixel", "auto"), cfg_sampler)
        _data_range(cfg_variance.get("data_range", (-1.0, 1.0)))


def build_variance(cfg_variance, cfg_sampler, schedule: NoiseSchedule, model_id: str):
    """variance=fixed -> None (the sampler's own variance); variance=analytic -> AnalyticVariance.

    Gamma comes from variance.gamma_path, else from the best matching gamma_<model_id>_*.safetensors in
    variance.search_dirs (the pretrained folder, then the cache folder); a missing or foreign file is a
    one-line error naming the `python run.py task=gamma ...` command that makes the right one.
    """
    validate_variance_cfg(cfg_variance, cfg_sampler)
    if cfg_variance.get("name") == "fixed":
        return None
    clip_pixel = _clip_pixel(cfg_variance.get("clip_pixel", "auto"), cfg_sampler)
    data_range = _data_range(cfg_variance.get("data_range", (-1.0, 1.0)))
    command = gamma_command(cfg_variance)
    path = cfg_variance.get("gamma_path", None)
    if not path:
        dirs = _search_dirs(cfg_variance)
        path = find_gamma(model_id, dirs, cfg_variance.get("dataset", None))
        if path is None:
            where = ", ".join(dirs) if dirs else "no variance.search_dirs"
            raise GammaMissing(f"no Gamma file for model {model_id} (searched {where}): estimate it with `{command}` "
                               f"or pass variance.gamma_path=...")
    g = load_gamma(path, model_id, schedule, command)
    return AnalyticVariance(schedule, g["gamma"].numpy(), g["timesteps"].numpy(), clip_pixel=clip_pixel,
                            data_range=data_range, model_id=model_id, path=g["path"])
