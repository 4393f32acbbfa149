"""task=train: an eps-prediction network (UNet2DModel, or U-ViT with backbone=uvit) trained with Lightning.

Loss: the simple DDPM objective (Ho et al. 2020, eq. 14), E_{t, x0, eps} ||eps - eps_theta(x_t, t)||^2
with t uniform in 0..N-1. AdamW, linear warm-up then cosine decay, gradient clipping, an EMA of the weights
(exported with save_pretrained, so `backbone.pretrained=<export_dir>` samples it), periodic sample grids
and a fast FID on the held-out split, resumable from <run_dir>/ckpts/last.ckpt, multi-GPU via `trainer=`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ..build import adapt, build_schedule, new_network, sample_shape
from ..outputs import output_dir


class DiffusionModule(L.LightningModule):
    def __init__(self, net_config: dict, schedule_cfg: dict, lr=2e-3, weight_decay=0.0, betas=(0.9, 0.999),
                 warmup_steps=200, max_steps=2400, ema_decay=0.999, backbone: str = "unet"):
        super().__init__()
        self.save_hyperparameters()
        self.net = new_network(backbone, net_config)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        sched = build_schedule(OmegaConf.create(schedule_cfg))
        self.register_buffer("alpha_bar", torch.tensor(sched.alpha_bar, dtype=torch.float32))

    def training_step(self, batch, batch_idx):
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        t = torch.randint(0, len(self.alpha_bar), (x0.shape[0],), device=x0.device)
        ab = self.alpha_bar[t].view(-1, *([1] * (x0.ndim - 1)))
        eps = torch.randn_like(x0)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        loss = F.mse_loss(self.net(xt, t).sample, eps)
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
            prog = (step - hp.warmup_steps) / max(1, hp.max_steps - hp.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def export_network(net, export_dir: Path, info: dict):
    """save_pretrained into a temporary folder, then swap it in: never a half-written model."""
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "train_state.json").write_text(json.dumps(info, indent=2))
    old = export_dir.with_name(export_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if export_dir.exists():
        export_dir.rename(old)
    tmp.rename(export_dir)
    shutil.rmtree(old, ignore_errors=True)


class ExportEMA(L.Callback):
    """Every `every` steps (and at the end) export the EMA network with save_pretrained."""

    def __init__(self, export_dir, every: int, meta: dict):
        self.export_dir, self.every, self.meta = Path(export_dir), every, meta

    def _export(self, trainer, pl_module):
        if trainer.is_global_zero:
            info = dict(self.meta, step=int(trainer.global_step),
                        loss=float(trainer.callback_metrics.get("train/loss", float("nan"))))
            export_network(pl_module.ema, self.export_dir, info)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._export(trainer, pl_module)


class SampleAndScore(L.Callback):
    """Every `every` steps: a sample grid of the EMA model and a fast FID on the held-out split."""

    def __init__(self, cfg, out_dir: Path, every: int):
        self.cfg, self.out_dir, self.every = cfg, Path(out_dir), every
        self.metrics = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        try:  # monitoring must never kill a long training run
            self._sample_and_score(trainer, pl_module, step)
        except Exception as e:
            print(f"[train] sample grid / fast FID failed at step {step}: {type(e).__name__}: {e}")

    @torch.no_grad()
    def _sample_and_score(self, trainer, pl_module, step):
        from ..denoiser import Denoiser
        from ..outputs import save_grid
        from ..samplers import sample
        from ..samplers.noise import SampleNoise

        cfg = self.cfg
        ema = pl_module.ema.eval()
        model = Denoiser(adapt(cfg.backbone.name, ema), build_schedule(cfg.backbone.schedule), "eps")
        sampler_cfg = OmegaConf.create({"name": "dpmpp", "steps": int(cfg.task.eval_steps), "order": 2,
                                        "lower_order_final": True, "timesteps": "logsnr"})
        n = int(cfg.task.eval_samples)
        shape = sample_shape(cfg)
        imgs = []
        for lo in range(0, n, 250):
            idx = range(lo, min(n, lo + 250))
            noise = SampleNoise(cfg.seed, idx, shape, device=pl_module.device)
            imgs.append(sample(sampler_cfg, model, noise(), noise, model.schedule).clamp(-1, 1).cpu())
        imgs = torch.cat(imgs)
        path = save_grid(imgs[:64], self.out_dir / "samples" / f"step_{step:07d}.png")
        logs = {}
        try:
            from ..metrics import Metrics

            if self.metrics is None:
                self.metrics = Metrics(cfg.metrics, cfg.dataset, pl_module.device)
            self.metrics.reset()
            self.metrics.update(imgs)
            logs = {f"eval/{k}": v for k, v in self.metrics.compute().items() if isinstance(v, (int, float))}
        except Exception as e:  # the classifier of a new dataset may not exist yet: grids only
            print(f"[train] fast FID unavailable at step {step}: {type(e).__name__}: {e}")
        for lg in trainer.loggers:
            lg.log_metrics(logs, step=step)
            if hasattr(lg, "log_image"):
                lg.log_image("samples", [str(path)], step=step)
        if logs:
            print(f"[train] step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))


def run(cfg) -> dict:
    from ..data import load_dataset
    from ..outputs import make_loggers

    L.seed_everything(int(cfg.seed), workers=True)
    out = Path(cfg.task.run_dir) if cfg.task.run_dir else output_dir()
    out.mkdir(parents=True, exist_ok=True)
    export_dir = Path(cfg.task.export_dir) if cfg.task.export_dir else out / str(cfg.backbone.name)
    t = cfg.task
    module = DiffusionModule(OmegaConf.to_container(cfg.backbone.config, resolve=True),
                             OmegaConf.to_container(cfg.backbone.schedule, resolve=True), lr=t.lr,
                             weight_decay=t.weight_decay, betas=list(t.betas), warmup_steps=t.warmup_steps,
                             max_steps=t.max_steps, ema_decay=t.ema_decay, backbone=str(cfg.backbone.name))
    meta = {"dataset": cfg.dataset.name, "backbone": str(cfg.backbone.name), "batch_size": int(t.batch_size),
            "max_steps": int(t.max_steps), "params": sum(p.numel() for p in module.net.parameters())}
    x = load_dataset(cfg.dataset, "train")
    x = x[0] if isinstance(x, tuple) else x
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=int(cfg.task.batch_size),
                                         shuffle=True, drop_last=True, num_workers=int(cfg.task.num_workers))
    ckpt_dir = out / "ckpts"
    loggers = make_loggers(cfg, out)
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_train_steps=int(t.ckpt_every),
                                            save_top_k=0),
        ExportEMA(export_dir, int(t.ckpt_every), meta),
        SampleAndScore(cfg, out, int(t.sample_every)),
    ]
    if loggers:  # logger=none: Lightning refuses a LearningRateMonitor without a logger
        callbacks.append(L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"))
    tr = cfg.trainer
    trainer = L.Trainer(accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=tr.strategy,
                        precision=tr.precision, max_steps=int(t.max_steps), gradient_clip_val=float(t.grad_clip),
                        callbacks=callbacks, logger=loggers or False, default_root_dir=str(out),
                        enable_checkpointing=True, log_every_n_steps=10, enable_model_summary=False)
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if (t.resume and last.exists()) else None
    if ckpt_path:
        print(f"[train] resuming from {last}")
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    result = {"steps": int(trainer.global_step), "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
              "export_dir": str(export_dir), **meta}
    return result
