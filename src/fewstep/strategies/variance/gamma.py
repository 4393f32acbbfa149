"""Gamma_t = E ||eps_theta(x_t, t)||^2 / d of Analytic-DPM (Bao et al. 2022, eq. 8): its Monte Carlo estimate
and its files.

Gamma is estimated once per model by Monte Carlo over data (`estimate_gamma`, run by `task=gamma`) and
stored in a file keyed by the model's content hash (`fewstep.identity.model_id`), the dataset and M: a
safetensors file (`fewstep.safe_io`, nothing in it can run code when it is read) whose tensors are
timesteps, gamma, stderr and the running sums, and whose JSON metadata holds the key and the provenance.
"""
from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from ...config import ConfigError
from ...identity import schedule_id
from ...safe_io import load_tensors, save_tensors
from ...schedule import NoiseSchedule

GAMMA_FORMAT = 2              # 1: the earlier torch.save pickle (.pt), no longer read
GAMMA_KIND = "gamma"
GAMMA_SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"


class GammaMissing(ConfigError):
    """No Gamma file for this model; the message names the command that makes one."""


class GammaMismatch(ConfigError):
    """A Gamma file belongs to another model (or schedule)."""


# ---------------------------------------------------------------------------- Monte Carlo estimate

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
    if isinstance(timesteps, str) or not np.iterable(timesteps):   # 'every', 2.5, True
        raise ValueError(f"timesteps must be 'all', a stride k >= 1 or a list of integers in [0, {N - 1}] "
                         f"(got {timesteps!r})")
    ts = np.asarray(list(timesteps))
    if (ts.size == 0 or ts.dtype.kind not in "iuf" or not np.all(np.mod(ts, 1) == 0) or ts.min() < 0
            or ts.max() > N - 1):
        raise ValueError(f"timesteps must be integers in [0, {N - 1}] (got {list(timesteps)})")
    return np.unique(ts.astype(np.int64))


@torch.no_grad()
def estimate_gamma(model, x0_iter: Iterable[torch.Tensor], schedule: NoiseSchedule, timesteps=None,
                   generator: Optional[torch.Generator] = None, stats: Optional[GammaStats] = None,
                   callback: Optional[Callable[[GammaStats], None]] = None, progress: bool = False,
                   total: Optional[int] = None) -> GammaStats:
    """Monte Carlo estimate of Gamma_t = E_{x_0, eps} ||eps_theta(x_t, t)||^2 / d (Analytic-DPM eq. 8).

    model: eps-predictor `model(x, t, **cond) -> eps` (a Denoiser, guided or not); x0_iter: batches of data
    x_0, or (x_0, cond) pairs with the condition of those points (cond = {"class_labels": y}: for a
    class-conditional model Gamma is the average over (x_0, y) pairs of the data); one noise draw
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
    for item in x0_iter:
        x0, cond = item if isinstance(item, tuple) else (item, {})
        g_sum = np.zeros(len(ts))
        g_sq = np.zeros(len(ts))
        for j, t in enumerate(ts):
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
            x_t = math.sqrt(ab[t]) * x0 + math.sqrt(1.0 - ab[t]) * eps
            g = model(x_t, float(t), **cond).double().flatten(1).pow(2).mean(1)
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


# ---------------------------------------------------------------------------- Gamma files

def guidance_tag(guidance: Optional[dict]) -> str:
    """"" for an unguided Gamma, else _g<8 hex of the guidance settings>: guided Gamma files of one model
    for different scales / intervals live side by side."""
    if guidance is None:
        return ""
    return "_g" + hashlib.sha1(json.dumps(guidance, sort_keys=True).encode()).hexdigest()[:8]


def gamma_filename(mid: str, dataset: str, M: int, guidance: Optional[dict] = None) -> str:
    return f"gamma_{mid}_{dataset}_M{int(M)}{guidance_tag(guidance)}{GAMMA_SUFFIX}"


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
               command: Optional[str] = None, guidance="any") -> dict:
    """Read a Gamma file -> dict of its metadata, tensors (timesteps, gamma, stderr), `stats` (GammaStats
    state) and `path`; refuse one made for another model or noise schedule or holding a non-finite Gamma
    (one-line GammaMismatch), and anything that is not a safetensors Gamma file (a pickle of the earlier .pt
    format is never unpickled)."""
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
    if guidance != "any" and obj.get("guidance") != guidance:
        made = "no guidance" if obj.get("guidance") is None else f"guidance {obj.get('guidance')}"
        want = "no guidance" if guidance is None else f"guidance {guidance}"
        raise GammaMismatch(f"{path} holds Gamma made with {made}, this run samples with {want} (the guided "
                            f"eps is another model); refusing it{hint}")
    if schedule is not None and obj.get("schedule_id") != schedule_id(schedule):
        raise GammaMismatch(f"{path} holds Gamma for another noise schedule (N={obj.get('N')}) than this model's "
                            f"(N={schedule.N}){hint}")
    if not bool(torch.isfinite(tensors["gamma"]).all()):   # nan would silently switch the noise off (sigma2 > 0)
        raise GammaMismatch(f"{path} holds non-finite Gamma values (inf or nan): re-estimate it with "
                            f"`{command or 'python run.py task=gamma'} task.overwrite=true`")
    obj.update({k: tensors[k] for k in ("timesteps", "gamma", "stderr")})
    if "stats_sum" in tensors and "stats_sumsq" in tensors:
        obj["stats"] = {"timesteps": tensors["timesteps"].numpy(), "sum": tensors["stats_sum"].numpy(),
                        "sumsq": tensors["stats_sumsq"].numpy(), "count": int(obj["M"])}
    obj["path"] = str(path)
    return obj


def gamma_timesteps_count(path) -> int:
    """How many timesteps a Gamma file holds (its `timesteps` tensor's length; -1 if it cannot be read)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return int(f.get_slice("timesteps").get_shape()[0])
    except Exception:   # not a safetensors file: load_gamma refuses it with its own line
        return -1


def find_gamma(mid: str, dirs: Sequence, dataset: Optional[str] = None, guidance: Optional[dict] = None,
               complete_for: Optional[int] = None) -> Optional[Path]:
    """The Gamma file of model `mid` (and of these guidance settings: see guidance_tag) in the first folder
    that has one: same dataset first, then largest M. complete_for=N (the optimal trajectory, which needs Gamma
    at every timestep): files estimated at all N timesteps come before strided ones.

    Only when no folder has one, a legacy gamma_<mid>_*.pt (pickle) is returned, for load_gamma to refuse
    with the command that makes a safe one (it is never unpickled).
    """
    for suffix in (GAMMA_SUFFIX, LEGACY_SUFFIX):
        for d in dirs:
            if not d or not os.path.isdir(os.path.expanduser(str(d))):
                continue
            tag = guidance_tag(guidance) if suffix == GAMMA_SUFFIX else ""
            pattern = re.compile(rf"_M\d+{re.escape(tag)}$")
            files = [Path(f) for f in glob.glob(os.path.join(glob.escape(os.path.expanduser(str(d))),
                                                             f"gamma_{mid}_*{suffix}"))]
            files = [f for f in files if pattern.search(f.name[: -len(suffix)])]
            if not files:
                continue

            def key(f: Path):
                stem = f.name[len(f"gamma_{mid}_"): -len(suffix) - len(tag) or None]
                ds, _, m = stem.rpartition("_M")
                complete = complete_for is not None and gamma_timesteps_count(f) == complete_for
                return (complete, ds == dataset, int(m) if m.isdigit() else -1, f.name)

            return max(files, key=key)
    return None


def gamma_command(cfg_variance) -> str:
    """The exact command that estimates Gamma for the configured model and dataset."""
    extra = []
    try:  # inside a Hydra run: repeat the user's dataset.* / backbone.* overrides too
        from hydra.core.hydra_config import HydraConfig

        extra = [o for o in HydraConfig.get().overrides.task
                 if o.split("=", 1)[0].lstrip("+~").startswith(("dataset.", "backbone.", "guidance"))]
    except Exception:
        pass
    parts = ["python run.py task=gamma"]
    for key, opt in (("dataset", "dataset"), ("backbone", "backbone"), ("pretrained", "backbone.pretrained")):
        v = cfg_variance[key]
        if v not in (None, "") and not any(o.split("=", 1)[0].lstrip("+~") == opt for o in extra):
            parts.append(f"{opt}={v}")
    return " ".join(parts + extra)
