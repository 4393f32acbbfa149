"""What a run leaves behind: the Hydra folder with config, sample grid, metrics.json; sweep summaries; W&B.

metrics.json is written last and atomically (tmp file + rename), so a folder that has one holds a finished
result; `resume=true` sweeps use that to skip finished jobs.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

METRICS_FILE = "metrics.json"


def output_dir() -> Path:
    """The Hydra output folder of this job (the cwd outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path(os.getcwd())


def write_text_atomic(path: Path, text: str) -> Path:
    """Write through a .tmp file and a rename: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 images, the quantization every image metric sees."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """N x C x H x W in [-1, 1] -> one PNG grid (2-px gaps)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = to_uint8(images.detach().cpu())
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    pad = 2
    grid = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
    return path


def save_points_plot(points: torch.Tensor, path: Path, reference: torch.Tensor | None = None) -> Path:
    """2-D samples (GMM) as a scatter plot, the 'grid' of vector datasets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.3, c="gray", label="data")
    ax.scatter(points[:, 0].cpu(), points[:, 1].cpu(), s=2, alpha=0.5, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- W&B
def wandb_settings(cfg) -> Dict[str, Any]:
    lg = cfg.logger
    out = output_dir()
    group = lg.get("group") or (out.parent.name if _is_multirun() else None)
    mode = os.environ.get("WANDB_MODE", lg.get("mode", "offline"))
    return dict(project=lg.get("project", "fewstep"), group=group, mode=mode, dir=str(out),
                name=out.name, config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def make_loggers(cfg, out: Path) -> List:
    """Lightning loggers for the logger group (wandb offline by default, csv, none)."""
    import lightning as L

    name = cfg.logger.name
    if name == "none":
        return []
    if name == "csv":
        return [L.pytorch.loggers.CSVLogger(str(out), name="csv")]
    s = wandb_settings(cfg)
    return [L.pytorch.loggers.WandbLogger(project=s["project"], group=s["group"], save_dir=s["dir"], name=s["name"],
                                          offline=s["mode"] == "offline", config=s["config"])]


class RunLogger:
    """One logging session per job: W&B run (offline by default), csv, or nothing. Always finished."""

    def __init__(self, cfg):
        self.name = cfg.logger.name
        self.run = None
        self.out = output_dir()
        if self.name == "wandb":
            import wandb

            s = wandb_settings(cfg)
            self.run = wandb.init(project=s["project"], group=s["group"], mode=s["mode"], dir=s["dir"], name=s["name"],
                                  config=s["config"], reinit=s["reinit"])

    def log(self, metrics: Dict[str, Any], images: Dict[str, Path] | None = None):
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        if self.run is not None:
            import wandb

            payload = dict(flat)
            for k, p in (images or {}).items():
                payload[k] = wandb.Image(str(p))
            self.run.log(payload)  # also sets the run summary
        elif self.name == "csv":
            with open(self.out / "metrics.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(flat.keys())
                w.writerow(flat.values())

    def finish(self):
        if self.run is not None:
            import wandb

            self.run.finish()
            wandb.finish()
            self.run = None


def read_offline_run(run_dir: Path) -> Dict[str, Any]:
    """The summary of an offline W&B run folder (offline-run-*), read from its .wandb record log.

    Lets tests and users check what a run logged without `wandb sync`. The file is a LevelDB-style log
    (32 KiB blocks, 7-byte record headers) of protobuf `Record`s; summary updates are replayed in order.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(Path(run_dir).glob("*.wandb"))
    data, block, pos, buf, summary = path.read_bytes(), 32768, 7, b"", {}

    def consume(raw):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)

    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 1:
            consume(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            consume(buf + chunk)
    return summary


# --------------------------------------------------------------------------- sweeps
SUMMARY_SKIP = ("config",)


def collect_summary(sweep_dir: Path) -> List[Dict[str, Any]]:
    """One row per job folder of a sweep: its overrides and its metrics.json."""
    rows = []
    for job in sorted(Path(sweep_dir).iterdir(), key=lambda p: (len(p.name), p.name)):
        mfile = job / METRICS_FILE
        if not job.is_dir() or not mfile.exists():
            continue
        metrics = json.loads(mfile.read_text())
        ov_file = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(ov_file)) if ov_file.exists() else []
        row = {"job": job.name, "overrides": " ".join(overrides)}
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) and k not in SUMMARY_SKIP})
        rows.append(row)
    return rows


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(sweep_dir: Path, rows: List[Dict[str, Any]] | None = None) -> List[Dict[str, Any]]:
    sweep_dir = Path(sweep_dir)
    rows = collect_summary(sweep_dir) if rows is None else rows
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write summary.csv / summary.md (and a W&B table)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        rows = write_summary(sweep_dir)
        print(f"[fewstep] sweep summary: {sweep_dir / 'summary.md'} ({len(rows)} jobs)")
        if config.logger.name == "wandb" and rows:
            try:
                import wandb

                mode = os.environ.get("WANDB_MODE", config.logger.get("mode", "offline"))
                run = wandb.init(project=config.logger.get("project", "fewstep"), group=sweep_dir.name, mode=mode,
                                 dir=str(sweep_dir), name=f"{sweep_dir.name}-summary", job_type="sweep_summary",
                                 reinit="finish_previous")
                keys = list(dict.fromkeys(k for r in rows for k in r))
                run.log({"summary": wandb.Table(columns=keys, data=[[_fmt(r.get(k, "")) for k in keys] for r in rows])})
                run.finish()
            except Exception as e:  # the summary files are the record; W&B is a copy
                print(f"[fewstep] W&B summary table not logged: {e}")
