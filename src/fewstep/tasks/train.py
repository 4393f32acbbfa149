"""task=train: an eps-prediction network (UNet2DModel, or U-ViT with backbone=uvit) trained with Lightning.

Loss: the simple DDPM objective (Ho et al. 2020, eq. 14), E_{t, x0, eps} ||eps - eps_theta(x_t, t)||^2
with t uniform in 0..N-1, optionally weighted per timestep by Min-SNR-gamma (Hang et al. 2023, "Efficient
Diffusion Training via Min-SNR Weighting Strategy", eq. 9 for eps-prediction: w_t = min(SNR_t, gamma) / SNR_t,
SNR_t = alpha_bar_t / (1 - alpha_bar_t); it stops the easy low-noise steps from dominating the gradient).
AdamW, linear warm-up then cosine decay (or a constant rate, for open-ended training), gradient clipping, an
EMA of the weights (exported with save_pretrained, so `backbone.pretrained=<export_dir>` samples it),
periodic sample grids and a fast FID on the held-out split, resumable from <run_dir>/ckpts/last.ckpt,
multi-GPU via `trainer=`.

Class-conditional networks (backbone=unet_cond, or a U-ViT with num_classes): the data module yields the
labels, and each is replaced by the null class (the last class embedding) with probability
task.label_dropout, so the one network learns eps(x_t, t, y) and eps(x_t, t, null), the pair that
classifier-free guidance combines (Ho & Salimans 2022: p = 0.1-0.2). The fast FID samples balanced labels
and also reports class_accuracy.

Long training over several sittings: `task.init_from=<folder>` starts from an exported model with a fresh
optimizer when no last.ckpt is there (its train_state.json `total_steps` carries on), `task.best_dir`
receives the EMA model each time the fast FID improves, and `task.progress_log` gets one CSV row per fast
FID (total step, loss, FID, wall time, whether it was the best so far).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ..config import check, group, user_errors
from ..build import adapt, build_schedule, class_embeds_of, load_pretrained, new_network, sample_shape
from ..fileio import atomic_dir, write_json_atomic, write_text_atomic
from ..run_folder import output_dir


class DiffusionModule(L.LightningModule):
    def __init__(self, net_config: dict, schedule_cfg: dict, lr=2e-3, weight_decay=0.0, betas=(0.9, 0.999),
                 warmup_steps=200, max_steps=2400, ema_decay=0.999, backbone: str = "unet",
                 lr_schedule: str = "cosine", min_snr_gamma: float | None = None, label_dropout: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = new_network(backbone, net_config)
        n_embeds = class_embeds_of(backbone, net_config)
        self.null_label = None if n_embeds is None else n_embeds - 1   # None: an unconditional network
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        sched = build_schedule(OmegaConf.create(schedule_cfg))
        self.register_buffer("alpha_bar", torch.tensor(sched.alpha_bar, dtype=torch.float32))

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weight of the eps loss at timesteps t (None: the unweighted simple loss)."""
        if self.hparams.min_snr_gamma is None:
            return None
        snr = self.alpha_bar[t] / (1 - self.alpha_bar[t])
        return snr.clamp(max=float(self.hparams.min_snr_gamma)) / snr

    def dropped_labels(self, y: torch.Tensor) -> torch.Tensor:
        """y with each label replaced by the null class with probability label_dropout."""
        drop = torch.rand(y.shape, device=y.device) < float(self.hparams.label_dropout)
        return torch.where(drop, torch.full_like(y, self.null_label), y)

    def training_step(self, batch, batch_idx):
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        cond = {} if self.null_label is None else {"class_labels": self.dropped_labels(batch[1])}
        t = torch.randint(0, len(self.alpha_bar), (x0.shape[0],), device=x0.device)
        ab = self.alpha_bar[t].view(-1, *([1] * (x0.ndim - 1)))
        eps = torch.randn_like(x0)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        per_sample = F.mse_loss(self.net(xt, t, **cond).sample, eps, reduction="none").flatten(1).mean(1)
        w = self.loss_weight(t)
        loss = per_sample.mean() if w is None else (w * per_sample).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.update_ema(self.global_step + 1)  # global_step counts this step only after the hook returns

    @torch.no_grad()
    def update_ema(self, n: int):
        """EMA after the n-th optimizer step, with the usual warm-up: decay_eff = min(decay, (1 + n) / (10 + n)).

        Done inside the optimizer step, so the batch-end callbacks (checkpoint, export) see the EMA of
        every step taken, and a resumed run continues exactly the EMA of an uninterrupted one."""
        d = min(self.hparams.ema_decay, (1 + n) / (10 + n))
        for pe, p in zip(self.ema.parameters(), self.net.parameters()):
            pe.lerp_(p.detach(), 1 - d)
        for be, b in zip(self.ema.buffers(), self.net.buffers()):
            be.copy_(b)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))

        def lr_lambda(step):
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.lr_schedule == "constant":
                return 1.0
            prog = (step - hp.warmup_steps) / max(1, hp.max_steps - hp.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def export_network(net, export_dir: Path, info: dict):
    """save_pretrained into a per-process temporary folder, then swap it in (`fileio.atomic_dir`): never a
    half-written model."""
    with atomic_dir(export_dir) as tmp:
        net.save_pretrained(str(tmp), safe_serialization=True)
        write_json_atomic(tmp / "train_state.json", info)    # strict JSON: a loss not logged yet is null


class ExportEMA(L.Callback):
    """Every `every` steps (and at the end) export the EMA network with save_pretrained."""

    def __init__(self, export_dir, every: int, meta: dict):
        self.export_dir, self.every, self.meta = Path(export_dir), every, meta

    def _export(self, trainer, pl_module):
        if trainer.is_global_zero:
            info = dict(self.meta, step=int(trainer.global_step),
                        total_steps=int(self.meta.get("steps_before", 0)) + int(trainer.global_step),
                        loss=float(trainer.callback_metrics.get("train/loss", float("nan"))))
            export_network(pl_module.ema, self.export_dir, info)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._export(trainer, pl_module)


class SampleAndScore(L.Callback):
    """Every `every` steps: a sample grid of the EMA model and a fast FID on the held-out split.

    With `progress` (a ProgressLog) each fast FID becomes a row of the progress log, and the EMA model is
    exported to its best_dir whenever the FID is the lowest the log has seen."""

    def __init__(self, cfg, out_dir: Path, every: int, progress: "ProgressLog | None" = None):
        self.cfg, self.out_dir, self.every, self.progress = cfg, Path(out_dir), every, progress
        self.metrics = None

    def on_train_start(self, trainer, pl_module):
        """With a progress log, score the model we start from (the init model, or the resumed state) unless
        the log has that step already: every sitting's first row, and every module the scoring needs is
        loaded now, so code edited while a long run goes on cannot meet this run half-loaded."""
        if self.progress is None or not trainer.is_global_zero:
            return
        rows = self.progress.rows()
        if not rows or int(rows[-1]["total_step"]) != self.progress.steps_before + trainer.global_step:
            self._safely(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        self._safely(trainer, pl_module, step)

    def _safely(self, trainer, pl_module, step):
        try:  # monitoring must never kill a long training run
            self._sample_and_score(trainer, pl_module, step)
        except Exception as e:
            print(f"[train] sample grid / fast FID failed at step {step}: {type(e).__name__}: {e}")

    @torch.no_grad()
    def _sample_and_score(self, trainer, pl_module, step):
        from ..conditions import sample_labels
        from ..denoiser import Denoiser
        from ..images import save_grid
        from ..samplers import sample
        from ..samplers.noise import SampleNoise

        cfg = self.cfg
        ema = pl_module.ema.eval()
        null = pl_module.null_label
        model = Denoiser(adapt(cfg.backbone.name, ema), build_schedule(cfg.backbone.schedule), "eps", null_label=null)
        # the fast FID's fixed protocol: DPM-Solver++(2M) on the logSNR grid, every key of conf/sampler/dpmpp.yaml
        sampler_cfg = group("sampler", "dpmpp", steps=int(cfg.task.eval_steps), order=2, lower_order_final=True,
                            timesteps="logsnr", endpoint=True)
        n = int(cfg.task.eval_samples)
        shape = sample_shape(cfg)
        imgs, labels = [], []
        for lo in range(0, n, 250):
            idx = range(lo, min(n, lo + 250))
            noise = SampleNoise(cfg.seed, idx, shape, device=pl_module.device)
            cond = {} if null is None else {"class_labels": sample_labels("balanced", cfg.seed, idx, null,
                                                                          pl_module.device)}
            imgs.append(sample(sampler_cfg, model, noise(), noise, model.schedule, extra_args=cond).clamp(-1, 1).cpu())
            labels.append(cond.get("class_labels"))
        imgs = torch.cat(imgs)
        labels = None if null is None else torch.cat(labels).cpu()
        path = save_grid(imgs[:64], self.out_dir / "samples" / f"step_{step:07d}.png")
        logs = {}
        try:
            from ..metrics import Metrics

            if self.metrics is None:
                self.metrics = Metrics(cfg.metrics, cfg.dataset, pl_module.device)
            self.metrics.reset()
            self.metrics.update(imgs, labels)
            logs = {f"eval/{k}": v for k, v in self.metrics.compute().items() if isinstance(v, (int, float))}
        except Exception as e:  # the classifier of a new dataset may not exist yet: grids only
            print(f"[train] fast FID unavailable at step {step}: {type(e).__name__}: {e}")
        for lg in trainer.loggers:
            lg.log_metrics(logs, step=step)
            if hasattr(lg, "log_image"):
                lg.log_image("samples", [str(path)], step=step)
        if logs:
            print(f"[train] step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        if self.progress is not None and "eval/fid" in logs:
            loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
            self.progress.record(pl_module.ema, step, loss, logs)


class ProgressLog:
    """The committed record of a long training run that outlives its ignored run folder.

    log: a CSV, one row per fast FID: total_step (steps before this run, from the init model's
    train_state.json, plus this run's), loss, fid, fid_se, precision, recall, wall_h (hours of training
    summed over sittings), utc, best (1 when this FID is the lowest so far: the model went to best_dir), and
    for a class-conditional model class_accuracy (a column added to an older log when it first appears)."""

    FIELDS = ["total_step", "loss", "fid", "fid_se", "precision", "recall", "wall_h", "utc", "best"]

    def __init__(self, log: Path, best_dir: Path | None, steps_before: int, meta: dict):
        self.log, self.best_dir, self.steps_before, self.meta = Path(log), best_dir, int(steps_before), meta
        rows = self.rows()
        self.best = min((float(r["fid"]) for r in rows), default=float("inf"))
        self.wall_before = float(rows[-1]["wall_h"]) if rows else 0.0
        self.t0 = time.time()

    def rows(self) -> list:
        if not self.log.exists():
            return []
        with open(self.log, newline="") as f:
            return list(csv.DictReader(f))

    def record(self, ema, step: int, loss: float, logs: dict):
        fid = float(logs["eval/fid"])
        best = fid < self.best
        total = self.steps_before + int(step)
        row = {"total_step": total, "loss": f"{loss:.5f}", "fid": f"{fid:.3f}",
               "fid_se": f"{logs.get('eval/fid_se', float('nan')):.3f}",
               "precision": f"{logs.get('eval/precision', float('nan')):.4f}",
               "recall": f"{logs.get('eval/recall', float('nan')):.4f}",
               "wall_h": f"{self.wall_before + (time.time() - self.t0) / 3600:.3f}",
               "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "best": int(best)}
        if "eval/class_accuracy" in logs:
            row["class_accuracy"] = f"{logs['eval/class_accuracy']:.4f}"
        if best and self.best_dir is not None:
            export_network(ema, self.best_dir, dict(self.meta, step=int(step), total_steps=total, loss=loss,
                                                    fast_fid=fid, fast_fid_eval=self.meta.get("fast_fid_eval")))
            self.best = fid
        self.log.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        fields = list(rows[0].keys()) if rows else list(self.FIELDS)
        fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows + [row])
        write_text_atomic(self.log, buf.getvalue())


def init_state(t, out: Path, resuming: bool) -> int:
    """Steps the network had before this run: 0, or `total_steps` of task.init_from's train_state.json.

    Written to <run_dir>/init.json at the first start, so a resumed run keeps counting from the same place."""
    marker = out / "init.json"
    if resuming and marker.exists():
        return int(json.loads(marker.read_text())["steps_before"])
    before = 0
    if t.init_from:
        state = Path(t.init_from) / "train_state.json"
        info = json.loads(state.read_text()) if state.exists() else {}
        before = int(info.get("total_steps", info.get("step", 0)))
    write_text_atomic(marker, json.dumps({"init_from": t.init_from, "steps_before": before}))
    return before


CLASS_EMBEDDING = ("class_embedding.", "label_emb.")   # UNet2DModel, U-ViT


def init_weights(module, state: dict) -> list:
    """Load `state` into the module's network and EMA. A class embedding the state lacks (an unconditional
    model growing into a class-conditional one) starts at zero, so the network starts as exactly the
    unconditional model it came from and learns what the labels add; returns those tensors' names. Any
    other mismatch is a ValueError."""
    own = module.net.state_dict()
    added = [k for k in own if k not in state]
    other = ([k for k in added if not k.startswith(CLASS_EMBEDDING)] + [k for k in state if k not in own]
             + [k for k in state if k in own and state[k].shape != own[k].shape])
    if other:
        raise ValueError(f"the init model does not fit this network ({len(other)} tensors differ, e.g. {other[0]})")
    full = dict(state, **{k: torch.zeros_like(own[k]) for k in added})
    module.net.load_state_dict(full)
    module.ema.load_state_dict(full)
    return added


# task=train's integer options and their least values: a fraction (batch_size=1.5) is refused, never truncated
TRAIN_INTEGERS = {"batch_size": 1, "max_steps": 1, "warmup_steps": 0, "ckpt_every": 1, "sample_every": 1,
                  "eval_samples": 1, "eval_steps": 1, "num_workers": 0}


def validate_train_cfg(t) -> None:
    """task=train's options (cfg.task), checked before any work: one-line ConfigError."""
    from . import _whole

    for key, lo in TRAIN_INTEGERS.items():
        _whole(t, key, lo, prefix="task.")
    check(str(t.lr_schedule) in ("cosine", "constant"),
          f"task.lr_schedule must be cosine or constant (got {t.lr_schedule})")
    if t.min_snr_gamma is not None:
        g = float(t.min_snr_gamma)
        check(math.isfinite(g) and g > 0, f"task.min_snr_gamma must be null or a finite number > 0 (got {g})")
    p = t.label_dropout
    check(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1,
          f"task.label_dropout must be a probability in [0, 1) (got {p!r})")
    if t.init_from:
        check((Path(t.init_from) / "config.json").exists(),
              f"task.init_from={t.init_from}: no save_pretrained folder there (config.json missing)")


def run(cfg) -> dict:
    from ..data.datamodule import DiffusionDataModule
    from ..loggers import make_loggers

    validate_train_cfg(cfg.task)
    if cfg.metrics.fid:   # the fast FID's metrics, checked once here (Metrics takes them as validated)
        from ..metrics import check_metrics_cfg

        with user_errors():
            check_metrics_cfg(cfg.metrics)
    L.seed_everything(int(cfg.seed), workers=True)
    out = Path(cfg.task.run_dir) if cfg.task.run_dir else output_dir()
    out.mkdir(parents=True, exist_ok=True)
    export_dir = Path(cfg.task.export_dir) if cfg.task.export_dir else out / str(cfg.backbone.name)
    t = cfg.task
    name = str(cfg.backbone.name)
    module = DiffusionModule(OmegaConf.to_container(cfg.backbone.config, resolve=True),
                             OmegaConf.to_container(cfg.backbone.schedule, resolve=True), lr=t.lr,
                             weight_decay=t.weight_decay, betas=list(t.betas), warmup_steps=t.warmup_steps,
                             max_steps=t.max_steps, ema_decay=t.ema_decay, backbone=name,
                             lr_schedule=str(t.lr_schedule), min_snr_gamma=t.min_snr_gamma,
                             label_dropout=float(t.label_dropout))
    ckpt_dir = out / "ckpts"
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if (t.resume and last.exists()) else None
    if ckpt_path:   # read safely before anything starts and before Lightning unpickles it (one line, exit 2)
        from ..safe_io import check_plain_checkpoint

        check_plain_checkpoint(last)
    steps_before = init_state(t, out, resuming=ckpt_path is not None)
    if t.init_from and not ckpt_path:  # a fresh optimizer on exported weights (the EMA restarts from them too)
        with user_errors("task.init_from: "):
            added = init_weights(module, load_pretrained(str(t.init_from), name=name).state_dict())
        print(f"[train] initialized from {t.init_from} ({steps_before} steps before this run)"
              + (f"; {', '.join(added)} new, zero" if added else ""))
    meta = {"dataset": cfg.dataset.name, "backbone": name, "batch_size": int(t.batch_size),
            "max_steps": int(t.max_steps), "params": sum(p.numel() for p in module.net.parameters()),
            "lr": float(t.lr), "lr_schedule": str(t.lr_schedule), "min_snr_gamma": t.min_snr_gamma,
            "ema_decay": float(t.ema_decay), "steps_before": steps_before, "init_from": t.init_from,
            "fast_fid_eval": f"{int(t.eval_samples)} samples, DPM-Solver++(2M) {int(t.eval_steps)} NFE, "
                             + (f"{cfg.metrics.feature} features vs the {cfg.metrics.ref_split} split" if cfg.metrics.fid
                                else f"no feature metrics (metrics={cfg.metrics.name})")}
    with user_errors("task=train: "):
        data = DiffusionDataModule(cfg.dataset, batch_size=int(t.batch_size), num_workers=int(t.num_workers),
                                   val_fraction=0.0, seed=int(cfg.seed), hflip=bool(t.hflip),
                                   with_labels=module.null_label is not None)
    loggers = make_loggers(cfg, out)
    progress = (ProgressLog(Path(t.progress_log), Path(t.best_dir) if t.best_dir else None, steps_before, meta)
                if t.progress_log else None)
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_train_steps=int(t.ckpt_every),
                                            save_top_k=0),
        ExportEMA(export_dir, int(t.ckpt_every), meta),
        SampleAndScore(cfg, out, int(t.sample_every), progress),
    ]
    if loggers:  # logger=none: Lightning refuses a LearningRateMonitor without a logger
        callbacks.append(L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"))
    tr = cfg.trainer
    trainer = L.Trainer(accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=tr.strategy,
                        precision=tr.precision, max_steps=int(t.max_steps), gradient_clip_val=float(t.grad_clip),
                        callbacks=callbacks, logger=loggers or False, default_root_dir=str(out),
                        enable_checkpointing=True, log_every_n_steps=10, enable_model_summary=False)
    if ckpt_path:
        print(f"[train] resuming from {last}")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    result = {"steps": int(trainer.global_step), "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
              "export_dir": str(export_dir), **meta}
    return result
