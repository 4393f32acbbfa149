"""Skip-connection strategies, as skip hooks of a backbone adapter (`UNetAdapter.skip_hooks`, and the
long token skips of `UViTAdapter.skip_hooks` for backbone=uvit).

A hook is called right before decoder layer i concatenates its decoder ("up", backbone)
feature u with the encoder ("down") feature d carried by skip i:

    hook(i, d, u, t) -> (d, u)        t: (B,) float model timesteps of the batch

Depth index i follows the adapter: i = 0 is the DEEPEST skip (next to the bottleneck,
consumed first by the decoder), i = k the shallowest (conv_in's output), k + 1 skips.

Strategies (conf/skip/<name>.yaml, chosen with ``skip=<name>``):

* ``none``   no hook at all.
* ``linear`` Skip-Tuning (Ma et al., ICML 2024, arXiv 2402.15170, Sec. 4). Skip i is multiplied by

      rho_i = rho_bottom + i (rho_top - rho_bottom) / k,      i = 0 (deepest) .. k (shallowest)

  (granularity ``skip``), or, one value per resolution level (granularity ``level``),

      rho_j = rho_bottom + j (rho_top - rho_bottom) / (L - 1),  j = 0 (lowest resolution) .. L - 1.

  The paper keeps rho_top = 1 and lowers rho_bottom (about 0.5-0.9) for ODE samplers at low
  NFE; SDE samplers may want rho >= 1. There is no official code: this file is our reference
  implementation, and `skip_scales` returns the exact list it applies.
* ``freeu``  FreeU (Si et al., CVPR 2024, arXiv 2309.11497) for UNet2DModel, exactly as diffusers'
  ``apply_freeu`` does for UNet2DConditionModel: in the two lowest-resolution up blocks
  (stage 1 = up block 0, stage 2 = up block 1), at every decoder layer, multiply the first half
  of the channels of u by b1 / b2 and scale the low-frequency band of d by s1 / s2
  (`fourier_filter`, threshold 1). Later up blocks are untouched.
* ``learned`` the rho_i learned by ``task=tune_rho`` (fewstep.tasks.tune_rho), read from the file
  it writes (``skip.path``, yaml or json): one factor per skip, or a per-step table rho_i(t)
  (each sample uses the row of the timestep nearest its t). Applied by `ScaleSkips` exactly as
  during tuning, so the samples are those of the tuned module.

Every strategy takes an optional ``t_range: [t_min, t_max]`` (model discrete timesteps,
inclusive): the hook acts only on the samples of the batch whose t lies inside it and is the
identity elsewhere (selected per sample with torch.where, so it is compile-friendly).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch


GRANULARITIES = ("skip", "level")


# ---------------------------------------------------------------------------- helpers
def parse_t_range(t_range) -> Optional[Tuple[float, float]]:
    """None or [t_min, t_max] (model timesteps, inclusive) -> None or a float pair."""
    if t_range is None:
        return None
    try:
        t_min, t_max = (float(v) for v in t_range)
    except (TypeError, ValueError):
        raise ValueError(f"t_range must be null or [t_min, t_max] with t_min <= t_max (got {t_range})") from None
    if not t_min <= t_max:
        raise ValueError(f"t_range must be null or [t_min, t_max] with t_min <= t_max (got {t_range})")
    return t_min, t_max


def window_mask(t: torch.Tensor, t_range: Optional[Tuple[float, float]], ndim: int = 4) -> Optional[torch.Tensor]:
    """(B, 1, ..., 1) bool mask of the samples whose timestep lies in t_range; None = everywhere."""
    if t_range is None:
        return None
    inside = (t >= t_range[0]) & (t <= t_range[1])
    return inside.reshape((-1,) + (1,) * (ndim - 1))


def _check_nonneg(**values):
    for name, v in values.items():
        if not float(v) >= 0:
            raise ValueError(f"{name} must be >= 0 (got {v})")


def _require_skips(adapter, strategy: str):
    if not getattr(adapter, "skips", None) or not hasattr(adapter, "skip_hooks"):
        raise ValueError(f"skip strategy '{strategy}' needs a backbone with skip connections "
                         f"(backbone=unet or uvit); {type(adapter).__name__} has none: use skip=none")


# ---------------------------------------------------------------------------- Skip-Tuning
def skip_scales(skips, rho_top: float = 1.0, rho_bottom: float = 1.0, granularity: str = "skip",
                levels: Optional[Sequence[int]] = None) -> List[float]:
    """The Skip-Tuning factors rho_i, indexed by depth i (0 = deepest skip).

    `skips` is an adapter (its `skips` give the levels) or the number of skips k + 1 (then
    granularity "level" needs `levels`, the resolution level of each depth, 0 = lowest).

        skip:   rho_i = rho_bottom + i (rho_top - rho_bottom) / k
        level:  rho_i = rho_bottom + level_i (rho_top - rho_bottom) / (L - 1)

    With a single skip (k = 0) or a single level (L = 1) every rho is rho_bottom.
    """
    _check_nonneg(rho_top=rho_top, rho_bottom=rho_bottom)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown skip granularity '{granularity}' (choose from {', '.join(GRANULARITIES)})")
    if isinstance(skips, int):
        n = skips
        if levels is None and granularity == "level":
            raise ValueError("granularity 'level' needs the level of each skip: pass an adapter or levels=")
    else:
        n = len(skips.skips)
        if levels is None:
            levels = [s.level for s in skips.skips]
    if n < 1:
        raise ValueError(f"number of skips must be >= 1 (got {n})")
    rho_top, rho_bottom = float(rho_top), float(rho_bottom)
    if granularity == "skip":
        k = n - 1
        return [rho_bottom + (i * (rho_top - rho_bottom) / k if k else 0.0) for i in range(n)]
    levels = list(levels)
    if len(levels) != n:
        raise ValueError(f"levels must give one level per skip ({n}), got {len(levels)}")
    top = max(levels)  # L - 1
    return [rho_bottom + (lv * (rho_top - rho_bottom) / top if top else 0.0) for lv in levels]


class ScaleSkips:
    """Skip hook d_i <- rho_i d_i for any per-skip factors (Skip-Tuning, learned rho, ...).

    scales:  a list of floats (one per depth i), a (K,) tensor (may require grad: gradients
             flow into it), or a (S, K) per-step table with `table_t` (S,) the model timesteps
             of its rows; each sample then uses the row whose timestep is nearest its t.
    t_range: [t_min, t_max] or None; outside it the skip is left exactly as is.
    """

    def __init__(self, scales: Union[Sequence[float], torch.Tensor], t_range=None,
                 table_t: Optional[Union[Sequence[float], torch.Tensor]] = None):
        self.t_range = parse_t_range(t_range)
        if torch.is_tensor(scales):
            if scales.ndim not in (1, 2) or (scales.ndim == 2) != (table_t is not None):
                raise ValueError("scales must be a (K,) tensor, or a (S, K) tensor with table_t of S timesteps")
            if not scales.requires_grad and bool((scales < 0).any()):
                raise ValueError(f"skip scales must be >= 0 (got {scales.tolist()})")
            self.scales = scales
            self.table_t = None if table_t is None else torch.as_tensor(table_t, dtype=torch.float32)
            if self.table_t is not None and self.table_t.shape != scales.shape[:1]:
                raise ValueError(f"table_t must have one timestep per row of scales ({scales.shape[0]})")
        else:
            if table_t is not None:
                raise ValueError("a per-step table must be a (S, K) tensor")
            self.scales = [float(s) for s in scales]
            _check_nonneg(**{f"rho_{i}": s for i, s in enumerate(self.scales)})
            self.table_t = None

    def __len__(self):
        return self.scales.shape[-1] if torch.is_tensor(self.scales) else len(self.scales)

    def rho(self, i: int, t: torch.Tensor):
        """rho_i for the batch: a float, a 0-dim tensor, or a (B,) tensor (per-step table)."""
        if self.table_t is None:
            return self.scales[i]
        table_t = self.table_t.to(t.device)
        row = (t.float()[:, None] - table_t[None, :]).abs().argmin(dim=1)
        return self.scales[row, i]

    def __call__(self, i: int, d: torch.Tensor, u: torch.Tensor, t: torch.Tensor):
        rho = self.rho(i, t)
        if isinstance(rho, float):
            if rho == 1.0:
                return d, u
            scaled = d * rho
        else:
            rho = rho.to(d.dtype)
            scaled = d * (rho.reshape((-1,) + (1,) * (d.ndim - 1)) if rho.ndim else rho)
        mask = window_mask(t, self.t_range, d.ndim)
        return (scaled if mask is None else torch.where(mask, scaled, d)), u

    def __repr__(self):
        s = self.scales if not torch.is_tensor(self.scales) else f"tensor{tuple(self.scales.shape)}"
        return f"ScaleSkips({s}, t_range={self.t_range})"


def linear(adapter, *, rho_top, rho_bottom, granularity, t_range, rows) -> list:
    """skip=linear (conf/skip/linear.yaml): Skip-Tuning's rho_i, linear in depth from rho_top (shallowest
    skip) to rho_bottom (deepest); [] when both are 1 (exactly the plain network)."""
    rho_top, rho_bottom, granularity = float(rho_top), float(rho_bottom), str(granularity)
    t_range = parse_t_range(t_range)
    # validate before looking at the backbone (rho < 0, unknown granularity)
    skip_scales(1, rho_top, rho_bottom, "skip")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown skip granularity '{granularity}' (choose from {', '.join(GRANULARITIES)})")
    if rho_top == 1.0 and rho_bottom == 1.0:
        return []
    _require_skips(adapter, "linear")
    scales = skip_scales(adapter, rho_top, rho_bottom, granularity)
    return restrict_rows([ScaleSkips(scales, t_range)], rows, adapter)


# ---------------------------------------------------------------------------- FreeU
def fourier_filter(x: torch.Tensor, threshold: int = 1, scale: float = 1.0) -> torch.Tensor:
    """FreeU's spectral modulation of a skip feature (Si et al. 2023, Alg. 1).

    Multiply the centred (fftshift'ed) 2D spectrum of x by `scale` on the square
    [H/2 - threshold, H/2 + threshold) x [W/2 - threshold, W/2 + threshold) (the lowest
    frequencies, DC included), leave the rest, and transform back (real part). Computed in
    float32 and cast back to x.dtype, as diffusers does; the result has x's memory layout.
    """
    x32 = x.float()
    spec = torch.fft.fftshift(torch.fft.fftn(x32, dim=(-2, -1)), dim=(-2, -1))
    H, W = spec.shape[-2:]
    crow, ccol = H // 2, W // 2
    mask = torch.ones((H, W), device=x.device)
    mask[crow - threshold: crow + threshold, ccol - threshold: ccol + threshold] = scale
    spec = spec * mask
    out = torch.fft.ifftn(torch.fft.ifftshift(spec, dim=(-2, -1)), dim=(-2, -1)).real
    return torch.empty_like(x).copy_(out)  # x's dtype and memory layout (convs downstream see the same strides)


class FreeU:
    """FreeU skip hook for a UNetAdapter (the diffusers "v1" variant, without FreeU v2's
    structure-aware backbone mask).

    At decoder layers of up block 0 (stage 1, lowest resolution) and up block 1 (stage 2):
        u[:, :C/2] <- b u[:, :C/2]              backbone factor b1 / b2   (amplify)
        d          <- IFFT(FFT(d) * (s on the 2*threshold lowest frequencies, 1 elsewhere))
                                                skip factor s1 / s2       (attenuate)
    """

    def __init__(self, skips, b1: float, b2: float, s1: float, s2: float, t_range=None, threshold: int = 1):
        _check_nonneg(b1=b1, b2=b2, s1=s1, s2=s2)
        if int(threshold) != threshold or threshold < 1:
            raise ValueError(f"FreeU threshold must be an integer >= 1 (got {threshold})")
        self.stage = [s.up_block for s in skips]  # by depth i
        self.b = (float(b1), float(b2))
        self.s = (float(s1), float(s2))
        self.threshold = int(threshold)
        self.t_range = parse_t_range(t_range)

    def __call__(self, i: int, d: torch.Tensor, u: torch.Tensor, t: torch.Tensor):
        stage = self.stage[i]
        if stage > 1:
            return d, u
        b, s = self.b[stage], self.s[stage]
        mask = window_mask(t, self.t_range, d.ndim)
        if b != 1.0:
            half = u.shape[1] // 2  # u[:, :half] * b, elementwise so u keeps its memory layout
            u_new = u * torch.tensor([b] * half + [1.0] * (u.shape[1] - half), dtype=u.dtype,
                                     device=u.device).reshape(1, -1, *(1,) * (u.ndim - 2))
            u = u_new if mask is None else torch.where(mask, u_new, u)
        if s != 1.0:
            d_new = fourier_filter(d, self.threshold, s)
            d = d_new if mask is None else torch.where(mask, d_new, d)
        return d, u

    def __repr__(self):
        return f"FreeU(b={self.b}, s={self.s}, threshold={self.threshold}, t_range={self.t_range})"


def freeu(adapter, *, b1, b2, s1, s2, threshold, t_range, rows) -> list:
    """skip=freeu (conf/skip/freeu.yaml): FreeU's backbone factors b and skip factors s; [] when all are 1."""
    b1, b2, s1, s2 = float(b1), float(b2), float(s1), float(s2)
    t_range = parse_t_range(t_range)
    _check_nonneg(b1=b1, b2=b2, s1=s1, s2=s2)
    if (b1, b2, s1, s2) == (1.0, 1.0, 1.0, 1.0):
        return []
    _require_skips(adapter, "freeu")
    from ..backbones.unet import UNetAdapter

    if not isinstance(adapter, UNetAdapter):
        raise ValueError(f"skip=freeu acts on the feature maps of a UNet decoder (backbone=unet); "
                         f"{type(adapter).__name__} has none: use skip=linear or skip=learned")
    return restrict_rows([FreeU(adapter.skips, b1, b2, s1, s2, t_range, threshold)], rows, adapter)


# ---------------------------------------------------------------------------- learned rho
RHO_FORMAT = "fewstep-rho/1"


def save_learned_rho(path, rho, table_t: Optional[Sequence[float]] = None, meta: Optional[dict] = None):
    """Write a rho file for skip=learned: rho (K,) by depth, or (S, K) rows for the S model timesteps
    `table_t`; yaml (.yaml/.yml) or json (.json). Floats are written with repr precision, so the file
    reads back exactly the same values. meta (model_id, sampler, ...) is stored alongside."""
    import json
    from pathlib import Path

    from ..fileio import write_text_atomic

    rho = torch.as_tensor(rho, dtype=torch.float32).detach().cpu()
    if rho.ndim not in (1, 2) or (rho.ndim == 2) != (table_t is not None):
        raise ValueError("rho must be (K,), or (S, K) with table_t giving the S timesteps")
    path = Path(path)
    data = dict(format=RHO_FORMAT, **(meta or {}), per_step=table_t is not None,
                t=None if table_t is None else [float(v) for v in table_t],
                rho=[float(v) for v in rho.tolist()] if rho.ndim == 1 else [[float(v) for v in r] for r in rho.tolist()])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    import yaml

    head = "# learned skip scales (task=tune_rho); use with: python run.py skip=learned skip.path=<this file>\n"
    return write_text_atomic(path, head + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))


def load_learned(path) -> dict:
    """Read a rho file written by task=tune_rho: {"rho": (K,) list or (S, K) rows, "t": None or S timesteps,
    "num_skips", "model_id", ...}. One-line ValueError when it is missing or malformed."""
    import json
    from pathlib import Path

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ValueError(f"skip.path={path}: no such file (write one with `python run.py task=tune_rho ...`)")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise ValueError(f"skip.path={path}: not a readable rho file ({type(e).__name__})") from None
    if not isinstance(data, dict) or "rho" not in data:
        raise ValueError(f"skip.path={path}: not a rho file of task=tune_rho (no 'rho' entry)")
    rho, ts = data["rho"], data.get("t")
    ok = isinstance(rho, list) and len(rho) > 0
    if ok and ts is None:
        ok = all(isinstance(v, (int, float)) for v in rho)
    elif ok:
        ok = isinstance(ts, list) and len(ts) == len(rho) and all(isinstance(r, list) and len(r) == len(rho[0]) for r in rho)
    if not ok:
        raise ValueError(f"skip.path={path}: 'rho' must be a list of K floats, or S rows of K floats with 't' "
                         f"giving the S timesteps")
    values = [v for r in rho for v in (r if isinstance(r, list) else [r])] + list(ts or [])
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"skip.path={path}: every rho and t must be a finite number")
    if any(v < 0 for r in rho for v in (r if isinstance(r, list) else [r])):
        raise ValueError(f"skip.path={path}: skip scales must be >= 0")
    return data


def learned(adapter, *, path, check_model, t_range, rows) -> list:
    """skip=learned (conf/skip/learned.yaml): the rho_i (one row, or one row per timestep) of a task=tune_rho
    file; check_model refuses a file learned for another network."""
    if not path:
        raise ValueError("skip=learned needs skip.path=<rho file written by task=tune_rho>")
    t_range = parse_t_range(t_range)
    data = load_learned(path)
    _require_skips(adapter, "learned")
    k = len(adapter.skips)
    n = len(data["rho"]) if data.get("t") is None else len(data["rho"][0])
    if n != k:
        raise ValueError(f"skip.path={path} holds {n} scales per step, the backbone has {k} skips")
    saved = data.get("model_id")
    if bool(check_model):
        from ..identity import model_id

        if not saved:
            raise ValueError(f"skip.path={path} names no model_id, so it cannot be checked against this backbone "
                             f"(set skip.check_model=false to use it anyway)")
        if model_id(adapter) != saved:
            raise ValueError(f"skip.path={path} was learned for model {saved}, this backbone is {model_id(adapter)} "
                             f"(set skip.check_model=false to use it anyway)")
    if data.get("t") is None:
        hook = ScaleSkips([float(v) for v in data["rho"]], t_range)
    else:
        table = torch.tensor(data["rho"], dtype=torch.float32)
        hook = ScaleSkips(table, t_range, table_t=[float(v) for v in data["t"]])
    return restrict_rows([hook], rows, adapter)


# ---------------------------------------------------------------------------- guided rows
ROWS = ("both", "cond")


class CondRowsOnly:
    """A skip hook restricted to the conditional rows of a guided call (skip.rows=cond).

    The denoiser puts a guided call's conditional rows first and sets `adapter.cond_rows` to their number
    for that call (None otherwise: every row is a conditional one); the unconditional rows pass unchanged."""

    def __init__(self, hook, adapter):
        self.hook, self.adapter = hook, adapter

    def __call__(self, i: int, d: torch.Tensor, u: torch.Tensor, t: torch.Tensor):
        n = getattr(self.adapter, "cond_rows", None)
        if n is None:
            return self.hook(i, d, u, t)
        dc, uc = self.hook(i, d[:n], u[:n], t[:n])
        return torch.cat([dc, d[n:]]), torch.cat([uc, u[n:]])


def restrict_rows(hooks: list, rows, adapter) -> list:
    """skip.rows (with guidance; every option but none has it): both scales the conditional and the
    unconditional rows alike, cond only the conditional ones."""
    if rows not in ROWS:
        raise ValueError(f"skip.rows must be both or cond (got {rows})")
    return [CondRowsOnly(h, adapter) for h in hooks] if rows == "cond" else hooks


def build_skip(cfg_skip, adapter) -> list:
    """Hooks for `cfg.skip` (conf/skip/<name>.yaml, every key set; its `_target_` is the builder above, or
    strategies.residual.residual), to append to `adapter.skip_hooks` (adapter.residual_hooks for
    skip=residual), in order. [] = plain network (skip=none, or scales that are all 1)."""
    from ..config import instantiate

    return instantiate(cfg_skip, adapter=adapter) or []
