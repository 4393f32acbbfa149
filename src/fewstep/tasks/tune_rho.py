"""task=tune_rho: learn the Skip-Tuning factors rho_i by distilling a many-step teacher into the M-step sampler.

    python run.py task=tune_rho sampler=dpmpp sampler.steps=10                  # learn rho for 10 NFE
    python run.py skip=learned skip.path=outputs/<...>/rho.yaml sampler=dpmpp sampler.steps=10   # use it

Skip-Tuning (Ma et al., ICML 2024) multiplies skip i by a hand-set linear rho_i. Here the rho_i are the only
trainable parameters of a LightningModule (the backbone is frozen):

    rho_i = rho_max * sigmoid(w_i)                 one per skip i (depth 0 = deepest), or, with
    rho_i(t_s) = rho_max * sigmoid(w_{s,i})        task.per_step=true, one per skip per sampling step,

initialised at the linear schedule of `skip.rho_top` / `skip.rho_bottom` (skip=linear), or at a previous
rho file (skip=learned skip.path=...). The objective (task.objective) compares, over the same initial
noise z of sample i (generator (task.seed, i)),

    trajectory:  L = mean || x0_M(z; rho) - x0_T(z; rho = 1) ||^2     pixels
    features:    L = mean || f(x0_M(z; rho)) - f(x0_T(z; rho = 1)) ||^2   f = the FID feature classifier
                                                                          (checkpoints/<dataset>/classifier)

where x0_M is the configured sampler at its M = sampler.steps steps and x0_T the same sampler at
T = task.teacher_steps (default 100) steps with the plain network. The loss is back-propagated through
all M steps of the sampler (task.grad_checkpointing=true recomputes each network call in the backward pass
instead of storing its activations: ~M times less memory for one more forward per call). The sampler
must be deterministic (ddim with eta = 0, dpmpp, euler, heun): with fresh noise at every step the student
and the teacher would not share a trajectory.

Teacher targets cost T network calls per sample; they are cached in task.cache_dir in a file keyed by the
model's content hash, the schedule, the teacher sampler, task.seed and the number of samples, and reused by
any later run with the same key (a file made with anything else is never read). The file is safetensors
(x0 as a tensor, the key as JSON metadata); a file at that path in any other format (a pickle of the earlier
.pt format) is refused with one line, never unpickled.

Outputs in the run folder: rho.yaml (the file `skip=learned skip.path=<file>` loads, exactly the same
scales), loss.csv (the training loss per step), rho.png, metrics.json (objective on the training and
held-out samples before / after, the rho values); the logger (W&B offline by default) gets the loss curve,
rho per skip and level at every step, and a final table of rho.

Sizes: the defaults (64 training samples, 200 Adam steps of batch 16, 10-step student, 100-step teacher)
take minutes on a CPU for the shipped 28 x 28 model. Evaluate with a seed other than task.seed (the
top-level `seed` defaults to 0, task.seed to 1000) so that the learned rho is judged on unseen noise.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import List

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from ..config import ConfigError
from ..fileio import atomic_path
from ..safe_io import jsonable, load_tensors, save_tensors
from ..samplers import sample
from ..samplers.noise import SampleNoise

OBJECTIVES = ("trajectory", "features")
TEACHER_KIND = "teacher"
DETERMINISTIC = ("ddim", "dpmpp", "euler", "heun")


# ---------------------------------------------------------------------------- validation
def validate_tune_cfg(cfg) -> None:
    """One-line ConfigError for every bad option, before any model is built."""
    t = cfg.task
    obj = t.objective
    if obj not in OBJECTIVES:
        raise ConfigError(f"unknown task.objective '{obj}' (choose from {', '.join(OBJECTIVES)})")
    for key in ("teacher_steps", "n_train", "batch_size", "max_steps"):
        v = t[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"task.{key} must be an integer >= 1 (got {v!r})")
    n_val = t.n_val
    if not isinstance(n_val, int) or isinstance(n_val, bool) or n_val < 0:
        raise ConfigError(f"task.n_val must be an integer >= 0 (got {n_val!r})")
    if not float(t.rho_max) > 0:
        raise ConfigError(f"task.rho_max must be > 0 (got {t.rho_max})")
    if not float(t.lr) > 0:
        raise ConfigError(f"task.lr must be > 0 (got {t.lr})")
    s = cfg.sampler
    if s.name not in DETERMINISTIC or (s.name == "ddim" and float(s.eta) != 0.0) or \
            cfg.variance.name != "fixed":
        raise ConfigError(f"task=tune_rho needs a deterministic sampler (ddim with eta=0, dpmpp, euler, heun; "
                          f"variance=fixed), got sampler={s.name}"
                          + (f" eta={s.eta}" if s.name == "ddim" else "") + f" variance={cfg.variance.name}")
    if int(t.teacher_steps) <= int(s.steps):
        raise ConfigError(f"task.teacher_steps must be > sampler.steps={s.steps} (got {t.teacher_steps})")
    if bool(t.grad_checkpointing) and cfg.cache.name != "none":
        raise ConfigError("task.grad_checkpointing=true cannot be combined with a cache strategy "
                          "(a recomputed call would see another cache state): use cache=none")
    if cfg.skip.name not in ("linear", "learned"):
        raise ConfigError(f"task=tune_rho starts from skip=linear (skip.rho_top / skip.rho_bottom) or skip=learned "
                          f"(a previous rho file), got skip={cfg.skip.name}")
    from ..parallel import is_multiprocess

    if is_multiprocess(cfg.trainer):
        raise ConfigError("task=tune_rho fits a handful of scalars on one device: use trainer=cpu or trainer=gpu")


# ---------------------------------------------------------------------------- parameters
def check_init(init, rho_max: float) -> torch.Tensor:
    init = torch.as_tensor(init, dtype=torch.float64)
    if not bool(((init > 0) & (init < rho_max)).all()):
        raise ConfigError(f"initial rho must lie in (0, task.rho_max={rho_max}) (got {init.tolist()}); "
                          f"raise task.rho_max or change skip.rho_top / skip.rho_bottom")
    return init


class SkipScales(nn.Module):
    """The trainable skip factors: rho = rho_max * sigmoid(w), w of shape (K,) or (S, K)."""

    def __init__(self, init: torch.Tensor, rho_max: float = 2.0):
        super().__init__()
        init = check_init(init, rho_max)
        self.rho_max = float(rho_max)
        self.w = nn.Parameter(torch.logit(init / rho_max).float())

    def forward(self) -> torch.Tensor:
        return self.rho_max * torch.sigmoid(self.w)


class Checkpointed(nn.Module):
    """A Denoiser whose every network call is recomputed in the backward pass (torch.utils.checkpoint):
    activations of one call at a time are kept instead of those of all M calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.schedule = model.schedule

    def forward(self, x, t, **extra):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.model, x, t, use_reentrant=False, **extra)

    def reset(self):
        self.model.reset()


# ---------------------------------------------------------------------------- teacher
def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def teacher_sampler_cfg(cfg):
    s = OmegaConf.create(OmegaConf.to_container(cfg.sampler, resolve=True))
    s.steps = int(cfg.task.teacher_steps)
    return s


def initial_noise(seed: int, indices, shape, device) -> torch.Tensor:
    return SampleNoise(int(seed), indices, shape, device=device)()


@torch.no_grad()
def teacher_x0(cfg, model, indices: np.ndarray, shape, device, mid: str) -> torch.Tensor:
    """x0 of the teacher (same sampler, task.teacher_steps steps, plain network) for the given sample indices,
    from the cache file of this key when there is one (written otherwise; task.teacher_cache=false: never)."""
    from ..identity import schedule_id

    from ..conditions import condition_digest
    from .evaluate import conditions

    t = cfg.task
    scfg = teacher_sampler_cfg(cfg)
    cond_of = lambda idx: conditions(cfg, model, idx, device)   # noqa: E731  (labels / prompt embeddings)
    key = dict(model_id=mid, schedule_id=schedule_id(model.schedule), sampler=OmegaConf.to_container(scfg),
               seed=int(t.seed), n=int(len(indices)), first=int(indices[0]), shape=list(shape),
               parameterization=model.parameterization)
    if cond_of(indices[:1]):   # a conditional network: the targets depend on the conditions and the guidance
        from ..strategies.guidance import guidance_key

        key.update(condition=condition_digest(cond_of(indices)), guidance=guidance_key(cfg.guidance))
    use_cache = bool(t.teacher_cache)
    path = Path(str(t.cache_dir)) / f"teacher_{mid}_{scfg.name}{scfg.steps}_s{t.seed}_n{len(indices)}_{_hash(key)}"
    path, legacy = path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".pt")
    if use_cache and path.exists():
        blob, meta = load_tensors(path, TEACHER_KIND, "delete it (the next run recomputes the targets) "
                                                      "or set task.teacher_cache=false")
        if meta.get("key") == jsonable(key) and "x0" in blob:
            print(f"[tune_rho] teacher targets from {path}")
            return blob["x0"]
    elif use_cache and legacy.exists():
        print(f"[tune_rho] not reading {legacy} (the earlier pickle format, which can run code); "
              f"recomputing the teacher targets, delete that file")
    print(f"[tune_rho] teacher: {scfg.name} with {scfg.steps} steps on {len(indices)} samples")
    out, bs = [], int(t.batch_size)
    for lo in range(0, len(indices), bs):
        idx = indices[lo: lo + bs]
        noise = SampleNoise(int(t.seed), idx, shape, device=device)
        model.reset()
        out.append(sample(scfg, model, noise(), noise, model.schedule, extra_args=cond_of(idx)).float().cpu())
    x0 = torch.cat(out)
    if use_cache:
        save_tensors(path, {"x0": x0}, TEACHER_KIND, {"key": key})
    return x0


# ---------------------------------------------------------------------------- objective
def load_feature_net(cfg, device):
    """The FID feature classifier of the dataset (frozen, eval), or a one-line ConfigError."""
    from ..metrics.classifier import load_classifier

    folder = cfg.task.classifier_dir
    try:
        net, info = load_classifier(folder)
    except FileNotFoundError:
        raise ConfigError(f"task.objective=features needs the feature classifier of dataset={cfg.dataset.name} in "
                          f"{folder} (model.safetensors + config.json): train it with `python run.py "
                          f"task=train_classifier dataset={cfg.dataset.name}`, or use task.objective=trajectory") from None
    size = info.get("image_size")
    if size is not None and int(size) != int(cfg.dataset.image_size):
        raise ConfigError(f"the classifier in {folder} takes {size}x{size} images, dataset={cfg.dataset.name} has "
                          f"{cfg.dataset.image_size}x{cfg.dataset.image_size}")
    return net.to(device).eval().requires_grad_(False)


def probe_timesteps(cfg_sampler, model, shape, device) -> List[float]:
    """The distinct model timesteps the sampler evaluates the network at, decreasing: the sampler runs on a
    stand-in model that records t and returns eps = 0 (the samplers take any callable; their time grids do
    not depend on the model's output), so the network is not called at all."""
    seen = []

    def probe(x, t, **extra):
        seen.append(float(t))
        return torch.zeros_like(x)

    with torch.no_grad():
        sample(cfg_sampler, probe, torch.zeros((1,) + tuple(shape), device=device), None, model.schedule)
    return sorted(set(seen), reverse=True)


class RhoTuner(L.LightningModule):
    """LightningModule whose only parameters are the skip factors (SkipScales); backbone and feature net frozen."""

    def __init__(self, model, cfg_sampler, init: torch.Tensor, rho_max: float, table_t=None, objective="trajectory",
                 feature_net=None, lr: float = 0.05, grad_checkpointing: bool = False, seed: int = 0, levels=None,
                 conditions=None):
        super().__init__()
        from ..strategies.skip import ScaleSkips

        self.model = model
        self.cfg_sampler = cfg_sampler
        self.scales = SkipScales(init, rho_max)
        self.table_t = None if table_t is None else [float(v) for v in table_t]
        self.hook = ScaleSkips(self.scales().detach(), table_t=self.table_t)
        model.backbone.skip_hooks.append(self.hook)
        self.objective = objective
        self.feature_net = feature_net
        self.lr = float(lr)
        self.grad_checkpointing = bool(grad_checkpointing)
        self.seed = int(seed)
        self.levels = list(levels) if levels is not None else [0] * init.shape[-1]
        self.history: List[float] = []
        self.conditions = conditions or (lambda idx: {})   # indices -> the extra_args of a conditional network

    def train(self, mode: bool = True):  # the frozen networks stay in eval mode (dropout, batch norm)
        super().train(mode)
        self.model.eval()
        if self.feature_net is not None:
            self.feature_net.eval()
        return self

    def rho(self) -> torch.Tensor:
        return self.scales()

    def student(self, indices, z: torch.Tensor) -> torch.Tensor:
        """x0 of the M-step sampler with the current rho (differentiable in rho)."""
        self.hook.scales = self.rho()
        net = Checkpointed(self.model) if self.grad_checkpointing and torch.is_grad_enabled() else self.model
        self.model.reset()
        noise = SampleNoise(self.seed, indices, z.shape[1:], device=z.device)
        return sample(self.cfg_sampler, net, z, noise, self.model.schedule, extra_args=self.conditions(indices))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.objective == "trajectory" else self.feature_net.features(x)

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """mean squared distance to the teacher (target: teacher x0, or its features)."""
        return (self.embed(x) - target).pow(2).mean()

    def training_step(self, batch, batch_idx):
        idx, z, target = batch
        loss = self.loss(self.student(idx.tolist(), z), target)
        self.history.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict(self.rho_logs(), on_step=True, on_epoch=False)
        return loss

    def rho_logs(self) -> dict:
        """rho/L<level>_d<depth>: the current rho of each skip (the mean over steps with a per-step table);
        rho_level/L<level>: their mean over the skips of each resolution level (0 = lowest resolution)."""
        rho = self.rho().detach()
        rho = (rho.mean(0) if rho.ndim == 2 else rho).tolist()
        out = {f"rho/L{lv}_d{i}": float(r) for i, (lv, r) in enumerate(zip(self.levels, rho))}
        for lv in sorted(set(self.levels)):
            out[f"rho_level/L{lv}"] = float(np.mean([r for r, l in zip(rho, self.levels) if l == lv]))
        return out

    def configure_optimizers(self):
        return torch.optim.Adam(self.scales.parameters(), lr=self.lr)

    @torch.no_grad()
    def objective_on(self, data) -> float:
        """The objective over a whole set (idx, z, target), batch by batch, weighted by batch size."""
        total, n = 0.0, 0
        for idx, z, target in data:
            z, target = z.to(self.device), target.to(self.device)
            total += float(self.loss(self.student(idx.tolist(), z), target)) * len(idx)
            n += len(idx)
        return total / max(n, 1)


# ---------------------------------------------------------------------------- task
def initial_rho(cfg, adapter) -> torch.Tensor:
    """(K,) or (S, K) start values from cfg.skip (linear schedule, or a previous rho file)."""
    from ..strategies.skip import build_skip, skip_scales

    if cfg.skip.name == "linear":
        return torch.tensor(skip_scales(adapter, float(cfg.skip.rho_top), float(cfg.skip.rho_bottom),
                                        str(cfg.skip.granularity)), dtype=torch.float64)
    hook = build_skip(cfg.skip, adapter)[0]
    return torch.as_tensor(hook.scales, dtype=torch.float64)


def _plain_cfg(cfg, **replace):
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for k, v in replace.items():
        c[k] = v
    return c


def _loader(idx, z, target, batch_size, shuffle, seed):
    ds = torch.utils.data.TensorDataset(torch.as_tensor(idx), z, target)
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return torch.utils.data.DataLoader(ds, batch_size=int(batch_size), shuffle=shuffle, generator=gen)


def fit(cfg, out: Path, hashed=None):
    """Build, train and save (metrics.json last, with the config_hash of `hashed`, the hashed config taken
    at the start, default cfg's now); returns (result dict, the trained RhoTuner)."""
    from ..build import build_denoiser, resolve_device, sample_shape
    from ..identity import model_id
    from ..loggers import finish_loggers, make_loggers
    from ..strategies.skip import save_learned_rho
    from .evaluate import conditions

    validate_tune_cfg(cfg)
    t = cfg.task
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    shape = sample_shape(cfg)
    model = build_denoiser(_plain_cfg(cfg, skip={"name": "none", "_target_": None}), device)   # the hooks come from the tuner
    adapter = model.backbone
    if not getattr(adapter, "skips", None):
        raise ConfigError(f"task=tune_rho needs a backbone with skip connections (backbone=unet or uvit), "
                          f"got backbone={cfg.backbone.name}")
    init = check_init(initial_rho(cfg, adapter), float(t.rho_max))
    levels = [s.level for s in adapter.skips]
    table_t = None
    if bool(t.per_step):
        table_t = probe_timesteps(cfg.sampler, model, shape, device)
        init = init.expand(len(table_t), -1).clone() if init.ndim == 1 else init
        if init.shape[0] != len(table_t):
            raise ConfigError(f"the start rho table has {init.shape[0]} rows, the sampler evaluates the network at "
                              f"{len(table_t)} timesteps: start from skip=linear")
    elif init.ndim == 2:
        raise ConfigError("skip.path holds a per-step rho table: set task.per_step=true to continue from it")
    feature_net = load_feature_net(cfg, device) if t.objective == "features" else None
    mid = model_id(adapter)

    n_train, n_val = int(t.n_train), int(t.n_val)
    indices = np.arange(n_train + n_val)
    x_teacher = teacher_x0(cfg, model, indices, shape, device, mid)
    z = initial_noise(int(t.seed), indices, shape, "cpu")
    with torch.no_grad():
        target = x_teacher if feature_net is None else torch.cat(
            [feature_net.features(x_teacher[i: i + 256].to(device)).cpu() for i in range(0, len(indices), 256)])
    train = (indices[:n_train], z[:n_train], target[:n_train])
    val = (indices[n_train:], z[n_train:], target[n_train:])

    tuner = RhoTuner(model, cfg.sampler, init, float(t.rho_max), table_t, t.objective, feature_net, float(t.lr),
                     bool(t.grad_checkpointing), int(t.seed), levels,
                     conditions=lambda idx: conditions(cfg, model, idx, device)).to(device)
    eval_sets = {"train": _loader(*train, t.batch_size, False, 0)}
    if n_val:
        eval_sets["val"] = _loader(*val, t.batch_size, False, 0)
    before = {f"{k}_loss_init": tuner.objective_on(v) for k, v in eval_sets.items()}
    print(f"[tune_rho] objective={t.objective} before: " + ", ".join(f"{k}={v:.5g}" for k, v in before.items()))

    loggers = make_loggers(cfg, out)
    tr = cfg.trainer
    trainer = L.Trainer(accelerator=tr.accelerator, devices=1, precision=tr.precision,
                        max_steps=int(t.max_steps), logger=loggers or False, enable_checkpointing=False,
                        log_every_n_steps=1, enable_model_summary=False, default_root_dir=str(out),
                        enable_progress_bar=bool(t.progress), num_sanity_val_steps=0)
    try:
        trainer.fit(tuner, _loader(*train, t.batch_size, True, t.seed))
        tuner.to(device)
        after = {f"{k}_loss_final": tuner.objective_on(v) for k, v in eval_sets.items()}
        print(f"[tune_rho] after {trainer.global_step} steps: " + ", ".join(f"{k}={v:.5g}" for k, v in after.items()))
        improved = after["train_loss_final"] < before["train_loss_init"]
        if not improved:   # Adam's steps are noisy minibatch steps: they can end above where they started
            from ..config import warn

            warn(f"task=tune_rho: the learned rho scores worse on its own training noise than the start "
                 f"({after['train_loss_final']:.5g} vs {before['train_loss_init']:.5g}); lower task.lr, raise "
                 f"task.batch_size or task.max_steps")
        rho = tuner.rho().detach().cpu()
        rho_path = Path(str(t.out)) if t.out else out / "rho.yaml"
        meta = dict(model_id=mid, num_skips=len(levels), levels=levels, objective=str(t.objective),
                    rho_max=float(t.rho_max), teacher_steps=int(t.teacher_steps),
                    sampler=OmegaConf.to_container(cfg.sampler, resolve=True), steps=int(trainer.global_step))
        save_learned_rho(rho_path, rho, table_t, meta)
        write_history(out / "loss.csv", tuner.history)
        plot_rho(out / "rho.png", rho, levels, table_t)
        result = dict(objective=str(t.objective), steps=int(trainer.global_step), rho_path=str(rho_path),
                      per_step=table_t is not None, improved=improved, **before, **after,
                      **{k: v for k, v in tuner.rho_logs().items()})
        if table_t is None:
            result["rho"] = [float(v) for v in rho.tolist()]
        log_final(loggers, result, rho, levels, table_t, out / "rho.png")
    finally:
        finish_loggers(loggers)
    from ..run_folder import write_result

    result = write_result(out, hashed if hashed is not None else cfg, result)
    print(f"[tune_rho] rho written to {rho_path}\n[tune_rho] use it: python run.py skip=learned skip.path={rho_path} "
          f"sampler={cfg.sampler.name} sampler.steps={cfg.sampler.steps}")
    return result, tuner


def write_history(path: Path, losses: List[float]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows([i, v] for i, v in enumerate(losses))


def plot_rho(path: Path, rho: torch.Tensor, levels, table_t=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if rho.ndim == 1:
        ax.plot(range(len(rho)), rho.numpy(), "o-")
        ax.set_xlabel("skip depth i (0 = deepest)")
    else:
        for i in range(rho.shape[1]):
            ax.plot(table_t, rho[:, i].numpy(), "o-", ms=3, label=f"d{i} (L{levels[i]})")
        ax.set_xlabel("model timestep t")
        ax.invert_xaxis()
        ax.legend(fontsize=6, ncol=2)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("rho")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def log_final(loggers, result: dict, rho: torch.Tensor, levels, table_t, image: Path) -> None:
    """Summary values + a table of the final rho (and the plot) in the W&B run."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        import wandb

        rows = rho.unsqueeze(0) if rho.ndim == 1 else rho
        ts = [None] if table_t is None else table_t
        data = [[ts[s], i, levels[i], float(rows[s, i])] for s in range(rows.shape[0]) for i in range(rows.shape[1])]
        lg.log_table(key="rho_table", columns=["t", "depth", "level", "rho"], data=data)
        lg.experiment.log({"rho_plot": wandb.Image(str(image))})
        for k, v in result.items():
            if isinstance(v, (int, float, str, bool)):
                lg.experiment.summary[k] = v


def run(cfg, out=None) -> dict:
    """Fit rho in the run folder (locked, resumed and its earlier results moved aside as evaluate's:
    run_folder.claim_run_folder); metrics.json carries the config_hash."""
    from ..run_folder import claim_run_folder, output_dir

    out = Path(out) if out is not None else output_dir()
    with claim_run_folder(cfg, out, tag="tune_rho") as claim:
        return claim.done if claim.done is not None else fit(cfg, out, claim.hashed)[0]
