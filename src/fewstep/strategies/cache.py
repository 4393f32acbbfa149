"""DeepCache (Ma, Fang, Wang, CVPR 2024, arXiv 2312.00858): reuse the UNet's high-level features.

Adjacent denoising steps produce nearly equal high-level (deep) features. DeepCache therefore
alternates two kinds of model call:

* **full** step: run the whole UNet and cache the decoder feature that enters the decoder layer
  consuming skip branch m (``UNetAdapter.forward_full(x, t, branch=m) -> (out, cache)``);
* **partial** step: recompute only the shallow path -- encoder layers E_0..E_m, then the decoder
  layers that consume skips m..0, starting from the cached feature, then conv_out
  (``UNetAdapter.forward_partial(x, t, cache, branch=m)``). Everything deeper, the mid block
  included, is skipped.

``branch`` m is the adapter's skip index (res_samples position, 0 = conv_in's output): m = 0 is the
shallowest, cheapest partial step, m = num_skips - 1 skips only the mid block. The official DDPM
code's ``--branch b`` (which starts at the first resnet) is m = b + 1: its CIFAR-10 setting
``--branch 2`` is m = 3, the output of the first downsampler.

Which calls are full (the paper's 1:N strategies, Sec. 3.3), over the T model calls of a run,
call index i = 0 .. T-1 in sampling order (i = 0 is the noisiest):

* ``uniform``:     full at i = 0, N, 2N, ...  (exactly ceil(T/N) full calls; needs no plan);
* ``nonuniform``:  k = ceil(T/N) full calls, denser around call c (where adjacent features are
                   least similar):   l_j in linspace(-(c^(1/p)), (T-c)^(1/p), k+1), j < k,
                                     I = unique_int(sign(l)|l|^p + c)                        (eq. 5)
                   unique_int = floor (so p = 1 gives the evenly spaced floor(jT/k)); call 0 is
                   always full. As in the official code, when two l_j land on the same integer p is
                   moved towards 1 in steps of 0.02 until the k indices are distinct. Needs T:
                   call ``plan(T)`` first. c = 15, p = 1.4 at T = 100 is the setting cited for the
                   official code; the default here scales it: c = round(0.15 T), p = 1.4.

The same two forwards exist for U-ViT (``UViTAdapter``, backbone=uvit): branch m = in block m's long
skip; a partial call runs the tokens, in blocks 0..m, then the out blocks that consume skips m..0 from
the cached token state, then the head (caching transformer blocks across steps as in Learning-to-Cache,
Ma et al. 2024, but at the granularity of DeepCache's branches).

Both forwards have static control flow for a fixed m, so each is wrapped by torch.compile on its
own (``compile: true``). Skip hooks (Skip-Tuning, FreeU) live on the adapter and act at full and
partial steps alike (at a partial step, those of the skipped deep layers are baked into the cache).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

SCHEDULES = ("uniform", "nonuniform")
DEFAULT_POWER = 1.4
DEFAULT_CENTER_FRACTION = 0.15   # official DDPM code: c = 15 of T = 100


# ---------------------------------------------------------------------------- config
def require_partial_forwards(backbone) -> None:
    """One-line ValueError unless the backbone adapter has DeepCache's full and partial forwards."""
    if not all(hasattr(backbone, a) for a in ("num_skips", "forward_full", "forward_partial")):
        raise ValueError(f"cache=deepcache needs a backbone with partial forwards (backbone=unet or uvit); "
                         f"got {type(backbone).__name__}")


def _is_int(v) -> bool:
    return (not isinstance(v, bool) and isinstance(v, (int, np.integer, float)) and math.isfinite(v)
            and float(v) == int(v))


def validate_cache_cfg(cfg) -> None:
    """Check every cache parameter that does not need the model; one ValueError line per problem.

    The upper end of `branch` depends on the UNet (0 .. adapter.num_skips - 1): `build_cache` checks it.
    Every key of conf/cache/deepcache.yaml must be there (strict reads: defaults live in the YAML only).
    """
    name = cfg["name"]
    if name == "none":
        return
    if name != "deepcache":
        raise ValueError(f"unknown cache '{name}' (choose from none, deepcache)")
    interval = cfg["interval"]
    if not _is_int(interval) or int(interval) < 1:
        raise ValueError(f"cache.interval must be an integer >= 1 (1 = cache off, N = one full call every N); got {interval}")
    branch = cfg["branch"]
    if not _is_int(branch) or int(branch) < 0:
        raise ValueError(f"cache.branch must be an integer skip index in 0..num_skips-1 (0 = shallowest); got {branch}")
    schedule = cfg["schedule"]
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown cache.schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
    power = cfg["power"]
    if not isinstance(power, (int, float)) or isinstance(power, bool) or not 0 < power < math.inf:
        raise ValueError(f"cache.power must be a number > 0 (1 = evenly spaced, > 1 denser around center); got {power}")
    center = cfg["center"]
    if center is not None and (not _is_int(center) or int(center) < 0):
        raise ValueError(f"cache.center must be null or a model-call index >= 0 (and < the run's NFE); got {center}")
    comp = cfg["compile"]
    if not isinstance(comp, bool):
        raise ValueError(f"cache.compile must be true or false; got {comp}")


# ---------------------------------------------------------------------------- schedules
def uniform_full_steps(total_calls: int, interval: int) -> List[int]:
    """Uniform 1:N: full calls at 0, N, 2N, ... < T."""
    return list(range(0, int(total_calls), int(interval)))


def nonuniform_full_steps(total_calls: int, interval: int, center: Optional[int] = None,
                          power: float = DEFAULT_POWER) -> Tuple[List[int], float]:
    """Non-uniform 1:N (DeepCache eq. 5): k = ceil(T/N) distinct call indices, denser around `center`.

    Returns (indices, the power actually used). Signed powers: (-c)^(1/p) is -(c^(1/p)) and l^p is
    sign(l)|l|^p. If the k indices are not distinct, p is moved towards 1 by 0.02 (official code);
    at p = 1 they are floor(jT/k), always distinct.
    """
    T, N = int(total_calls), int(interval)
    if T < 1:
        raise ValueError(f"total_calls must be >= 1 (got {total_calls})")
    k = math.ceil(T / N)
    if k >= T:
        return list(range(T)), float(power)
    c = int(round(DEFAULT_CENTER_FRACTION * T)) if center is None else int(center)
    if not 0 <= c <= T - 1:
        raise ValueError(f"cache.center must be in 0..{T - 1} for a run of {T} model calls; got {c}")
    p = float(power)
    while True:
        lo, hi = -(c ** (1.0 / p)), (T - c) ** (1.0 / p)
        l = np.linspace(lo, hi, k + 1)[:-1]              # the endpoint maps to T: past the last call
        v = np.round(np.sign(l) * np.abs(l) ** p, 9)      # round off float noise before flooring
        idx = np.clip(np.floor(v + c), 0, T - 1).astype(int)
        idx[0] = 0                                        # call 0 is always full
        idx = np.unique(idx)
        if len(idx) == k or p == 1.0:
            return [int(i) for i in idx], p
        p = round(max(p - 0.02, 1.0) if p > 1 else min(p + 0.02, 1.0), 6)


# ---------------------------------------------------------------------------- the cache
class DeepCache:
    """Callable cache strategy: ``cache(backbone, x, t_batch) -> (out, kind)``, kind "full" or "partial@m".

    One object serves one sampling run at a time: `reset()` (the Denoiser calls it per run and per
    batch) drops the cached feature and restarts the call counter; `plan(T)` tells it the run's
    number of model calls (needed by the non-uniform schedule, harmless for the uniform one).
    """

    def __init__(self, interval: int, branch: int, schedule: str = "uniform", center: Optional[int] = None,
                 power: float = DEFAULT_POWER, compile: bool = False, compile_backend: str = "inductor",
                 num_skips: Optional[int] = None):
        # the arguments come from a validated config (tasks.validate -> validate_cache_cfg, once per run);
        # only the branch's upper end needs the network
        if num_skips is not None and not 0 <= int(branch) <= num_skips - 1:
            raise ValueError(f"cache.branch must be in 0..{num_skips - 1} for this UNet ({num_skips} skips, "
                             f"0 = shallowest/cheapest); got {branch}")
        self.interval = int(interval)
        self.branch = int(branch)
        self.schedule = schedule
        self.center = None if center is None else int(center)
        self.power = float(power)
        self.compile = bool(compile)
        self.compile_backend = compile_backend
        self.kind_partial = f"partial@{self.branch}"
        self.total_calls: Optional[int] = None
        self.power_used: Optional[float] = None
        self._full_set: Optional[set] = None
        self._fns = None          # (backbone, full_fn, partial_fn), built lazily for the backbone in use
        self.reset()

    def __repr__(self):
        return (f"DeepCache(interval={self.interval}, branch={self.branch}, schedule={self.schedule}, "
                f"center={self.center}, power={self.power}, compile={self.compile})")

    def with_interval(self, interval: int, schedule: Optional[str] = None) -> "DeepCache":
        """Another cache on the same branch with its own state and schedule, sharing this one's
        (possibly compiled) forwards: no recompilation."""
        other = DeepCache(interval, self.branch, schedule or self.schedule, self.center, self.power,
                          self.compile, self.compile_backend)
        other._fns = self._fns
        return other

    # -------------------------------------------------------------- run bookkeeping
    def reset(self):
        """Drop the cached feature and restart the call counter (new sampling run or new batch)."""
        self._cache = None
        self._cache_for = None   # (batch size, device, dtype) of the input of the full call that made it
        self._i = 0
        self._last_full = None

    def plan(self, total_calls: int):
        """Tell the cache the run makes `total_calls` model calls (T); also starts a new run."""
        T = int(total_calls)
        if T < 1:
            raise ValueError(f"total_calls must be >= 1 (got {total_calls})")
        self.total_calls = T
        self._full_set = set(self.full_steps(T))
        self.reset()

    def full_steps(self, total_calls: int) -> List[int]:
        """Indices (0-based, sampling order) of the full calls among `total_calls` model calls."""
        if self.schedule == "uniform":
            return uniform_full_steps(total_calls, self.interval)
        idx, self.power_used = nonuniform_full_steps(total_calls, self.interval, self.center, self.power)
        return idx

    def is_full(self, i: int) -> bool:
        """Whether model call i of the run is a full call according to the schedule."""
        if i == 0:
            return True
        if self.schedule == "uniform":
            return i % self.interval == 0
        if self._full_set is None:
            raise ValueError("cache.schedule=nonuniform needs the run's number of model calls: call cache.plan(nfe) "
                             "before sampling (or use schedule=uniform)")
        if i < self.total_calls:
            return i in self._full_set
        # more calls than planned: keep at least one full call every N
        return self._last_full is None or i - self._last_full >= self.interval

    # -------------------------------------------------------------- forwards
    def _eager_forwards(self, backbone):
        """The backbone's full and partial forwards for this cache's branch: full(x, t, **cond) -> (out,
        cache), partial(x, t, cache, **cond) -> out."""
        require_partial_forwards(backbone)
        return (functools.partial(backbone.forward_full, branch=self.branch),
                functools.partial(backbone.forward_partial, branch=self.branch))

    def _functions(self, backbone):
        if self._fns is None or self._fns[0] is not backbone:
            full, part = self._eager_forwards(backbone)
            if self.compile:
                full = torch.compile(full, backend=self.compile_backend)
                part = torch.compile(part, backend=self.compile_backend)
            self._fns = (backbone, full, part)
        return self._fns[1], self._fns[2]

    def _cache_fits(self, x: torch.Tensor) -> bool:
        # compared with the input, not the cached feature: under autocast the feature is bf16 / fp16
        return self._cache is not None and self._cache_for == (x.shape[0], x.device, x.dtype)

    def __call__(self, backbone, x: torch.Tensor, t_batch: torch.Tensor, **cond):
        """cond: the condition of the rows (class_labels), passed to both forwards. A guided call has twice
        the rows of an unguided one, so a cache made by the other kind does not fit: that call is full."""
        full_fn, partial_fn = self._functions(backbone)
        i = self._i
        self._i += 1
        if not self.is_full(i) and self._cache_fits(x):
            return partial_fn(x, t_batch, self._cache, **cond), self.kind_partial
        out, cache = full_fn(x, t_batch, **cond)
        self._cache = tuple(c.detach() if torch.is_tensor(c) else c for c in cache)
        self._cache_for = (x.shape[0], x.device, x.dtype)
        self._last_full = i
        return out, "full"

    # -------------------------------------------------------------- cost
    @torch.no_grad()
    def measure_macs(self, backbone, x: torch.Tensor, t: float = 500.0, **cond) -> Dict[str, float]:
        """MACs per sample of a full and of a partial call (FlopCounterMode FLOPs / 2 / batch).

        Runs the eager forwards once each on `x`; attention is counted through the math SDPA path.
        """
        from ..metrics.cost import full_and_partial_macs

        full_fn, part_fn = self._eager_forwards(backbone)
        B = x.shape[0]
        tb = torch.full((B,), float(t), dtype=torch.float32, device=x.device)
        full, part = full_and_partial_macs(lambda: full_fn(x, tb, **cond), lambda c: part_fn(x, tb, c, **cond))
        return {"full": full / B, self.kind_partial: part / B}


# ---------------------------------------------------------------------------- builder
def deepcache(adapter, *, interval, branch, schedule, center, power, compile, compile_backend) -> Optional[DeepCache]:
    """cache=deepcache (conf/cache/deepcache.yaml) -> a DeepCache on `adapter`, or None at interval 1 (every
    call full). The branch is checked against the network (0 .. num_skips - 1)."""
    if int(interval) == 1:
        return None
    require_partial_forwards(adapter)
    return DeepCache(interval=int(interval), branch=int(branch), schedule=str(schedule), center=center,
                     power=float(power), compile=bool(compile), compile_backend=str(compile_backend),
                     num_skips=adapter.num_skips)


def build_cache(cfg_cache, adapter) -> Optional[DeepCache]:
    """A validated cfg.cache (conf/cache/*.yaml, every key set; its `_target_` is deepcache above or
    block_cache.block_cache) -> the cache object, or None when the cache is off (cache=none, or interval 1)."""
    from ..config import instantiate

    return instantiate(cfg_cache, adapter=adapter)
