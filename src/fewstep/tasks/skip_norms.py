"""task=skip_norms: the skip-connection diagnostic of Skip-Tuning (Ma et al., ICML 2024).

At every skip i and every network evaluation of a sampling run it measures

    prop_i = ||d_i||_2 / ||u_i||_2

the norm of the encoder feature d_i carried by skip i over the norm of the decoder feature u_i
it is concatenated with (per sample, over all C x H x W entries, then averaged over the batch).
The recorder is a skip hook placed AFTER the strategy hooks, so it sees d and u as the decoder
layer consumes them (after Skip-Tuning's rho_i, after FreeU's b and s).

The configured sampler (and variance rule, and cache) is run on one batch (task.batch_size, or
the top-level batch_size; samples 0..B-1 of cfg.seed) with the same noise twice: "plain" (no skip hook) and with the skip strategy installed by
`build_denoiser` (named after cfg.skip.name); once only when that strategy is trivial. It writes
into the run folder

    skip_norms.csv   variant, step, t, depth, level, prop   (one row per evaluation and skip)
    skip_norms.png   left: prop_i over the evaluations, one line per depth (solid = plain,
                     dashed = strategy); right: the average over evaluations, bars per depth
    metrics.json     prop/<variant>/i<depth> (average over evaluations), nfe/<variant>

`step` counts network evaluations (a Heun step has two); `t` is the model timestep of that
evaluation; `sampler_step` is the sampler's step i it belongs to, from the samplers' per-step
`callback(i, t, x, x0)` (called after a step's first evaluation: the evaluation just made opens step i,
and any evaluation after it before the next callback, Heun's correction, belongs to step i too). With a
cache strategy (DeepCache) a partial evaluation only recomputes the shallow skips, so only those are
recorded for it. Usage:

    python run.py task=skip_norms sampler=ddim sampler.steps=10 skip.rho_bottom=0.7

Transformers (skip=residual, and backbone=dit, which has no long skips): the same table for the residual
branches of the blocks, prop_i = ||r_i||_2 / ||h||_2, branch r_i (after DiT's adaLN-Zero gate, after
skip=residual's rho) over the stream h it is added to; depth = branch i (2b attention, 2b + 1 MLP of
block b), level = block b. A conditional network samples with its labels (`labels`, as task=evaluate).

    python run.py task=skip_norms backbone=dit backbone.pretrained=<folder> skip=residual skip.rho_bottom=0.8
"""
from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..fileio import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("variant", "step", "sampler_step", "t", "depth", "level", "prop")


class SkipNormRecorder:
    """Skip hook recording prop_i = mean_b ||d_i[b]|| / ||u_i[b]|| at every call; returns (d, u) unchanged.

    A new network evaluation starts whenever the depth index does not increase (the decoder
    visits i = 0, 1, ..., k in order, or a shallow suffix of it for a partial forward).
    """

    def __init__(self):
        self.records = []  # (step, t, depth, prop) with t and prop 0-dim tensors (no sync while sampling)
        self.step = -1
        self._last = None
        self.opens = {}    # evaluation -> the sampler step it opens (from `callback`)

    def callback(self, i: int, t, x, x0):
        """The samplers' per-step callback: the evaluation just recorded is the first of sampler step i."""
        self.opens[self.step] = int(i)

    def sampler_steps(self) -> dict:
        """evaluation -> sampler step: each evaluation belongs to the step the last callback before it opened
        (None where no callback was called)."""
        out, cur = {}, None
        for e in range(self.step + 1):
            cur = self.opens.get(e, cur)
            out[e] = cur
        return out

    def __call__(self, i: int, d: torch.Tensor, u: torch.Tensor, t: torch.Tensor):
        if self._last is None or i <= self._last:
            self.step += 1
        self._last = i
        with torch.no_grad():
            ratio = d.detach().flatten(1).float().norm(dim=1) / u.detach().flatten(1).float().norm(dim=1)
            self.records.append((self.step, t.detach().float().mean(), i, ratio.mean()))
        return d, u

    def rows(self, variant: str, skips) -> List[dict]:
        of = self.sampler_steps()
        return [dict(variant=variant, step=s, sampler_step=of.get(s), t=float(t), depth=i, level=skips[i].level,
                     prop=float(p)) for s, t, i, p in self.records]


def measure_skip_norms(adapter, sample_fn: Callable[[Callable], object], variants: Dict[str, Sequence],
                       hooks: str = "skip_hooks", infos: str = "skips") -> List[dict]:
    """Run `sample_fn(callback)` once per variant with adapter.<hooks> = variant hooks + a recorder, the
    recorder's `callback` handed to the sampler (it labels each evaluation with its sampler step).

    `variants` maps a label to its list of strategy hooks ([] = plain network). The adapter's
    own hooks are restored afterwards. Returns the rows of skip_norms.csv. hooks="residual_hooks",
    infos="residuals" measure the residual branches of transformer blocks instead (skip=residual, DiT):
    prop_i = ||r_i|| / ||h||, branch i over the stream it is added to (depth = branch, level = block).
    """
    if not getattr(adapter, infos, None):
        raise ValueError(f"skip norms need a backbone with skip connections (backbone=unet or uvit) or transformer "
                         f"residual branches (backbone=dit), not {type(adapter).__name__}")
    saved = getattr(adapter, hooks)
    rows: List[dict] = []
    try:
        for label, variant in variants.items():
            recorder = SkipNormRecorder()
            setattr(adapter, hooks, list(variant) + [recorder])
            with torch.no_grad():
                sample_fn(recorder.callback)
            rows += recorder.rows(label, getattr(adapter, infos))
    finally:
        setattr(adapter, hooks, saved)
    return rows


def summarize(rows: Sequence[dict]) -> Dict[str, float]:
    """prop/<variant>/i<depth>: average over evaluations; prop_max/<variant>/i<depth> and prop_max/<variant>:
    the largest over evaluations (and skips), which says whether prop_i < 1 held at every skip and step;
    nfe/<variant>: evaluations recorded."""
    acc = defaultdict(list)
    steps = defaultdict(set)
    for r in rows:
        acc[(r["variant"], r["depth"])].append(r["prop"])
        steps[r["variant"]].add(r["step"])
    out = {f"prop/{v}/i{i}": sum(p) / len(p) for (v, i), p in sorted(acc.items())}
    out.update({f"prop_max/{v}/i{i}": max(p) for (v, i), p in sorted(acc.items())})
    for v in steps:
        out[f"prop_max/{v}"] = max(max(p) for (w, _), p in acc.items() if w == v)
    out.update({f"nfe/{v}": len(s) for v, s in steps.items()})
    return out


def write_skip_norms(rows: Sequence[dict], out_dir: str, residual: bool = False):
    """Write skip_norms.csv and skip_norms.png into out_dir; returns their paths. residual: the rows are
    residual branches (depth = branch i, level = block), labelled so in the plot."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "skip_norms.csv")
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    png_path = os.path.join(out_dir, "skip_norms.png")
    _plot(rows, png_path, residual)
    return csv_path, png_path


def _plot(rows: Sequence[dict], path: str, residual: bool = False):
    from matplotlib import cm
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    depths = sorted({r["depth"] for r in rows})
    level = {r["depth"]: r["level"] for r in rows}
    series = defaultdict(list)
    for r in rows:
        series[(r["variant"], r["depth"])].append((r["step"], r["prop"]))
    colors = cm.viridis([j / max(len(depths) - 1, 1) for j in range(len(depths))])
    styles = ["-", "--", ":", "-."]
    style_names = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}

    fig = Figure(figsize=(12, 4.5), tight_layout=True)
    ax, bx = fig.subplots(1, 2)
    for vi, v in enumerate(variants):
        for c, i in zip(colors, depths):
            pts = sorted(series.get((v, i), []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[vi % len(styles)], color=c,
                        label=(f"i={i} (block {level[i]})" if residual else f"i={i} (level {level[i]})") if vi == 0 else None)
    ax.set_xlabel("network evaluation (step)")
    ax.set_ylabel(r"$\|r_i\| / \|h\|$" if residual else r"$\|d_i\| / \|u_i\|$")
    ax.set_title(", ".join(f"{style_names[styles[vi % len(styles)]]}: {v}" for vi, v in enumerate(variants)))
    ax.legend(fontsize=7, ncol=2)

    width = 0.8 / len(variants)
    for vi, v in enumerate(variants):
        means = [sum(p for _, p in series[(v, i)]) / max(len(series[(v, i)]), 1) for i in depths]
        bx.bar([i + (vi - (len(variants) - 1) / 2) * width for i in depths], means, width, color=colors,
               edgecolor="black", hatch=None if vi == 0 else "//")
        bx.bar([0], [0], 0, color="white", edgecolor="black", hatch=None if vi == 0 else "//", label=v)  # legend
    bx.set_xticks(depths)
    bx.set_xlabel("residual branch i (2b: attention, 2b + 1: MLP of block b)" if residual else "skip depth i (0 = deepest)")
    bx.set_ylabel("average over evaluations")
    bx.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def _batch_size(cfg) -> int:
    task_bs = cfg.task.batch_size            # null: the top-level batch_size
    bs = int(task_bs if task_bs is not None else cfg.batch_size)
    if bs < 1:
        raise ValueError(f"task.batch_size must be >= 1 (got {bs})")
    return bs


def run(cfg, out_dir: Optional[str] = None) -> dict:
    """Measure the skip norms with and without the configured skip strategy; write csv, png, metrics.json
    (with config_hash; the folder is locked and resumed as evaluate's: run_folder.claim_run_folder)."""
    from ..run_folder import claim_run_folder, output_dir

    out = Path(out_dir) if out_dir is not None else output_dir()
    with claim_run_folder(cfg, out) as claim:
        return claim.done if claim.done is not None else _measure(cfg, out, claim.hashed)


def _measure(cfg, out: Path, hashed) -> dict:
    from ..build import build_denoiser, explicit_timesteps, resolve_device, sample_shape
    from ..loggers import RunLogger
    from ..run_folder import write_result
    from ..samplers import planned_nfe, sample
    from ..samplers.noise import SampleNoise
    from .evaluate import build_variance_rule, conditions

    batch_size = _batch_size(cfg)
    if cfg.backbone.name not in ("unet", "sd_unet", "uvit", "dit"):
        raise ValueError(f"task=skip_norms needs a backbone with skip connections (backbone=unet, sd_unet or uvit) or "
                         f"residual branches (backbone=dit), not backbone={cfg.backbone.name}")
    # skip=residual (and a DiT, which has no long skips): the residual branches of the transformer blocks
    residual = cfg.skip.name == "residual" or cfg.backbone.name == "dit"
    hooks, infos = ("residual_hooks", "residuals") if residual else ("skip_hooks", "skips")
    device = resolve_device(cfg.device)
    shape = sample_shape(cfg)
    model = build_denoiser(cfg, device)
    variance = build_variance_rule(cfg, model)
    ts = explicit_timesteps(cfg.sampler, variance)
    adapter = model.backbone
    strategy = list(getattr(adapter, hooks))  # what build_denoiser installed from cfg.skip

    def sample_fn(callback):
        noise = SampleNoise(int(cfg.seed), range(batch_size), shape, device=device)
        z = noise()
        model.reset()
        if model.cache is not None and hasattr(model.cache, "plan"):
            model.cache.plan(planned_nfe(cfg.sampler, model.schedule, ts))
        return sample(cfg.sampler, model, z, noise, model.schedule, variance=variance, timesteps=ts, callback=callback,
                      extra_args=conditions(cfg, model, range(batch_size), device))   # a conditional network's labels

    variants = {"plain": []}
    if strategy:
        variants[str(cfg.skip.name)] = strategy
    rows = measure_skip_norms(adapter, sample_fn, variants, hooks, infos)
    csv_path, png_path = write_skip_norms(rows, str(out), residual)
    result = summarize(rows)
    result.update({"batch_size": batch_size, "sampler": cfg.sampler.name, "steps": int(cfg.sampler.steps),
                   "skip": cfg.skip.name, "cache": cfg.cache.name})
    result = write_result(out, hashed, result)    # before the logger: its presence means the run finished
    logger = RunLogger(cfg)
    try:
        logger.log(result, {"skip_norms": Path(png_path)})
    finally:
        logger.finish()
    log.info("skip norms of %d variant(s) written to %s and %s", len(variants), csv_path, png_path)
    return result
