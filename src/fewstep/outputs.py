"""What a run leaves behind: the Hydra folder with config, sample grid, metrics.json; sweep summaries; W&B.

metrics.json is written after the samples and atomically (`atomic_path`: a per-process tmp file + rename),
so a folder that has one holds a finished result. It carries `config_hash`, the hash of the resolved config
without the keys that cannot change a result (`HASH_IGNORED`: resume, logger, tags, hydra); `resume=true`
skips a job only when that hash is the one of its config now. A run that starts in a folder first takes the
folder's lock (`RunFolder`: a second live process is refused with one line) and moves an earlier run's
result files aside (`move_results_aside`: metrics.json -> metrics.json.prev-<time>). Loggers start only
after the results are on disk, and a logger failure is one warning line.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from . import fileio as _fileio
from .fileio import atomic_path, write_json_atomic, write_text_atomic

strict_json, write_bytes_atomic = _fileio.strict_json, _fileio.write_bytes_atomic   # their home is fewstep.fileio

METRICS_FILE = "metrics.json"


def output_dir() -> Path:
    """The Hydra output folder of this job (the cwd outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path(os.getcwd())


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
    with atomic_path(path) as tmp:
        Image.fromarray(arr[..., 0] if c == 1 else arr).save(tmp, format="PNG")
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- run folders
LOCK_FILE = ".fewstep.lock"
RESULT_CONFIG_FILE = "metrics.config.json"   # the hashed config of the metrics.json beside it (says what changed)
# what an earlier run left as its result: moved aside (renamed <name>.prev-<time>) when a new run starts
RESULT_FILES = (METRICS_FILE, RESULT_CONFIG_FILE, "metrics.csv", "samples.png", "samples.npz", "features.npz",
                "nll_bpd.npz")
# top-level config keys that cannot change a result: left out of the config hash
HASH_IGNORED = ("resume", "logger", "tags", "hydra")


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock."""


def hashed_config(cfg) -> Dict[str, Any]:
    """The resolved config that decides a result: everything but HASH_IGNORED (resume, logger, tags, hydra).
    cfg: a config, or a plain dict (e.g. what this returned before: it comes back unchanged)."""
    try:
        c = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    except Exception:  # an interpolation that only resolves inside a Hydra job: hash it as written
        c = OmegaConf.to_container(cfg, resolve=False)
    return {k: v for k, v in c.items() if k not in HASH_IGNORED}


def config_hash(cfg) -> str:
    """16 hex digits of sha256 over the canonical JSON of hashed_config(cfg) (cfg: a config, or a dict that
    hashed_config already made); stored in metrics.json."""
    text = json.dumps(hashed_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else []):
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict, limit: int = 3) -> str:
    """'sampler.steps: 3 -> 5, seed: 0 -> 1 (+2 more)' between two hashed configs."""
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    parts = [f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in keys[:limit]]
    return ", ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def finished_result(cfg, out: Path):
    """(metrics, None) when out/metrics.json was made by this config (same config_hash), else (None, why):
    why is None when there is no metrics.json at all, else one phrase saying why it does not count."""
    mfile = Path(out) / METRICS_FILE
    if not mfile.exists():
        return None, None
    try:
        metrics = json.loads(mfile.read_text())
    except (OSError, ValueError) as e:
        return None, f"its {METRICS_FILE} is unreadable ({type(e).__name__})"
    old = metrics.get("config_hash") if isinstance(metrics, dict) else None
    if old is None:
        return None, f"its {METRICS_FILE} has no config_hash (written before fewstep kept one)"
    new = config_hash(cfg)
    if old == new:
        return metrics, None
    why = f"its {METRICS_FILE} was made by another config (config_hash {old}, now {new})"
    try:
        diff = config_diff(json.loads((Path(out) / RESULT_CONFIG_FILE).read_text()), hashed_config(cfg))
        if diff:
            why = f"its {METRICS_FILE} was made by another config: {diff}"
    except (OSError, ValueError):
        pass
    return None, why


def move_results_aside(out: Path) -> List[str]:
    """Rename an earlier run's result files (RESULT_FILES) to <name>.prev-<YYYYmmdd-HHMMSS>, so a folder never
    holds an old result beside a new config (a killed re-run leaves no metrics.json). Returns the new names."""
    out = Path(out)
    found = [n for n in RESULT_FILES if (out / n).exists()]
    if not found:
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix, i = f".prev-{stamp}", 1
    while any((out / (n + suffix)).exists() for n in found):
        i += 1
        suffix = f".prev-{stamp}-{i}"
    moved = []
    for n in found:
        try:
            os.replace(out / n, out / (n + suffix))
            moved.append(n + suffix)
        except FileNotFoundError:
            pass
    return moved


def write_result(out: Path, cfg, result: Dict[str, Any]) -> Dict[str, Any]:
    """metrics.json with the config_hash of cfg (a config, or hashed_config taken when the run started) and
    the hashed config beside it (metrics.config.json), atomically. Returns the result as written."""
    out = Path(out)
    hashed = hashed_config(cfg)
    result = dict(result, config_hash=config_hash(hashed))
    write_json_atomic(out / RESULT_CONFIG_FILE, hashed)
    write_json_atomic(out / METRICS_FILE, result)   # last: its presence means the run finished
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """An exclusive lock on a run folder for one process: `with RunFolder(out): ...`.

    The lock is an fcntl.flock on out/.fewstep.lock, which holds the owner's pid and host. The kernel drops
    a flock when its process dies, so a lock file left by a killed run is stale by construction and simply
    taken over; a live holder makes RunFolderBusy (a ConfigError: one line, exit 2). Where fcntl is missing,
    the file is created with O_EXCL and a lock of a dead pid on this host is removed."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.fd = None

    def _busy(self, holder: str):
        who = holder.strip() or "another process"
        raise RunFolderBusy(f"{self.out} is in use by {who}: wait for it to finish, or use another run folder")

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info.get('pid')} on {info.get('host')}"
        except (OSError, ValueError):
            return ""

    def acquire(self) -> "RunFolder":
        self.out.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            import fcntl
        except ImportError:  # no flock: O_EXCL, and a lock of a dead pid on this host is stale
            fcntl = None
        for _ in range(5):
            if fcntl is None:
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    try:
                        info = json.loads(self.path.read_text() or "{}")
                    except (OSError, ValueError):
                        info = {}
                    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
                        self.path.unlink(missing_ok=True)
                        continue
                    self._busy(self._holder())
                os.write(fd, me.encode())
                self.fd = fd
                return self
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                self._busy(self._holder())
            try:  # the holder before us may have unlinked the file we locked: lock the one that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, me.encode())
            self.fd = fd
            return self
        raise RunFolderBusy(f"could not lock {self.path}: it keeps changing under us")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)   # while still locked: nobody else holds this file now
        finally:
            os.close(self.fd)                   # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# --------------------------------------------------------------------------- W&B
# Logging is a copy of the results, never a condition for them: metrics.json and the samples are written
# before any logger starts, and every W&B failure (no API key, no network, an error inside wandb) is one
# warning line on stderr, with the run going on and exiting 0.
WANDB_INIT_TIMEOUT_S = 20.0   # wandb's default is 90 s (and it retries): a run without network waits this long
WANDB_KEYLESS_MODES = ("offline", "dryrun", "disabled")


def warn(msg: str) -> None:
    print(f"[fewstep] warning: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def wandb_mode(cfg_logger) -> str:
    """WANDB_MODE in the environment wins over logger.mode (offline by default)."""
    return str(os.environ.get("WANDB_MODE") or cfg_logger.get("mode", "offline") or "offline")


def wandb_api_key_found() -> bool:
    """Whether wandb would find credentials without asking: WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE, a
    .netrc entry for the W&B host (`wandb login` writes one), or an api_key in wandb's settings file."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    from urllib.parse import urlsplit

    bases = [os.environ["WANDB_BASE_URL"]] if os.environ.get("WANDB_BASE_URL") else ["https://api.wandb.ai"]
    if not os.environ.get("WANDB_BASE_URL"):
        try:  # the default host of this wandb version (0.2x: api.wandb.ai; later: a CoreWeave host)
            from wandb.sdk.lib.urls import DEFAULT_BASE_URL

            bases.append(DEFAULT_BASE_URL)
        except Exception:
            pass
    hosts = [urlsplit(b if "//" in b else "https://" + b).netloc for b in bases]
    paths = [Path(os.environ["NETRC"]).expanduser()] if os.environ.get("NETRC") else \
        [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    for p in paths:
        if p.is_file():
            try:
                import netrc

                entries = netrc.netrc(str(p))
                if any(entries.authenticators(h) for h in hosts):
                    return True
            except (OSError, netrc.NetrcParseError):
                pass
    cfg_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    try:
        import configparser

        cp = configparser.ConfigParser()
        cp.read(cfg_dir / "settings")
        return bool(cp.get("default", "api_key", fallback=""))
    except (OSError, configparser.Error):
        return False


def wandb_skip_reason(mode: str) -> Optional[str]:
    """Why W&B must not be started in this mode (None: go ahead): online without an API key would ask for
    one, or block on the network, instead of logging."""
    if mode not in WANDB_KEYLESS_MODES and not wandb_api_key_found():
        return (f"W&B logging skipped: WANDB_MODE/logger.mode is {mode} but no W&B API key is set "
                f"(WANDB_API_KEY or `wandb login`); use logger.mode=offline to log locally")
    return None


def wandb_init(cfg_logger, **kwargs):
    """wandb.init(**kwargs) with a short init_timeout; None (and one warning line) instead of any failure."""
    reason = wandb_skip_reason(kwargs.get("mode", "offline"))
    if reason:
        warn(reason)
        return None
    try:
        import wandb

        settings = wandb.Settings(init_timeout=float(cfg_logger.get("init_timeout", WANDB_INIT_TIMEOUT_S)))
        return wandb.init(settings=settings, **kwargs)
    except (Exception, SystemExit) as e:
        warn(f"W&B logging skipped: wandb.init failed ({_one_line(e)}); the results are in the run folder")
        return None


def wandb_settings(cfg) -> Dict[str, Any]:
    lg = cfg.logger
    out = output_dir()
    group = lg.get("group") or (out.parent.name if _is_multirun() else None)
    return dict(project=lg.get("project", "fewstep"), group=group, mode=wandb_mode(lg), dir=str(out),
                name=out.name, config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def make_loggers(cfg, out: Path) -> List:
    """Lightning loggers for the logger group (wandb offline by default, csv, none).

    logger.mode=disabled (or WANDB_MODE=disabled) gives no logger; online without an API key, or a W&B run
    that cannot start, gives a warning line and no logger (the W&B run starts here, not in the middle of fit)."""
    import lightning as L

    name = cfg.logger.name
    if name == "none":
        return []
    if name == "csv":
        return [L.pytorch.loggers.CSVLogger(str(out), name="csv")]
    s = wandb_settings(cfg)
    mode = s["mode"]
    if mode == "disabled":
        return []
    reason = wandb_skip_reason(mode)
    if reason:
        warn(reason)
        return []
    try:
        import wandb

        settings = wandb.Settings(init_timeout=float(cfg.logger.get("init_timeout", WANDB_INIT_TIMEOUT_S)))
        logger = L.pytorch.loggers.WandbLogger(project=s["project"], group=s["group"], save_dir=s["dir"],
                                               name=s["name"], offline=mode in ("offline", "dryrun"),
                                               config=s["config"], mode=mode, settings=settings)
        logger.experiment  # noqa: B018  (start the run now: a failure is a warning, not a crash in fit)
    except (Exception, SystemExit) as e:
        warn(f"W&B logging skipped: wandb.init failed ({_one_line(e)}); training goes on without a logger")
        return []
    return [logger]


class RunLogger:
    """One logging session per job: W&B run (offline by default), csv, or nothing. Always finished.

    Start it after the results are written: no W&B failure leaves the constructor, log or finish; each is
    one warning line (and no more W&B for this session)."""

    def __init__(self, cfg):
        self.name = cfg.logger.name
        self.run = None
        self.out = output_dir()
        if self.name == "wandb":
            s = wandb_settings(cfg)
            if s["mode"] != "disabled":
                self.run = wandb_init(cfg.logger, project=s["project"], group=s["group"], mode=s["mode"],
                                      dir=s["dir"], name=s["name"], config=s["config"], reinit=s["reinit"])

    def log(self, metrics: Dict[str, Any], images: Dict[str, Path] | None = None):
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        if self.run is not None:
            try:
                import wandb

                payload = dict(flat)
                for k, p in (images or {}).items():
                    payload[k] = wandb.Image(str(p))
                self.run.log(payload)  # also sets the run summary
            except (Exception, SystemExit) as e:
                warn(f"W&B logging failed ({_one_line(e)}); the results are in the run folder")
                self._finish(quiet=True)
        elif self.name == "csv":
            with atomic_path(self.out / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(flat.keys())
                w.writerow(flat.values())

    def _finish(self, quiet: bool = False):
        run, self.run = self.run, None
        if run is None:
            return
        try:
            import wandb

            run.finish()
            wandb.finish()
        except (Exception, SystemExit) as e:
            if not quiet:
                warn(f"W&B run not finished cleanly ({_one_line(e)}); the results are in the run folder")

    def finish(self):
        self._finish()


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
SUMMARY_SKIP = ("config", "config_hash")
SWEEP_JOBS_FILE = ".fewstep_jobs"   # in the sweep folder: "<job num>\t<job folder>" per job of the last sweep


def collect_summary(sweep_dir: Path, jobs: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """One row per job folder of a sweep: its overrides and its metrics.json. jobs: only these job folders
    (names, in this order); None: every job folder there."""
    sweep_dir = Path(sweep_dir)
    if jobs is None:
        folders = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
    else:
        folders = [sweep_dir / j for j in dict.fromkeys(jobs)]
    rows = []
    for job in folders:
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


def sweep_jobs(sweep_dir: Path) -> Optional[List[str]]:
    """The job folders of the last sweep run into sweep_dir (by job number), as SweepSummary recorded them;
    None if it recorded none."""
    f = Path(sweep_dir) / SWEEP_JOBS_FILE
    if not f.exists():
        return None
    jobs = {}
    for line in f.read_text().splitlines():
        num, _, name = line.partition("\t")
        if name and num.strip().lstrip("-").isdigit():
            jobs[name] = int(num)          # a job recorded twice keeps its last number
    return sorted(jobs, key=lambda n: (jobs[n], n))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(sweep_dir: Path, rows: List[Dict[str, Any]] | None = None) -> List[Dict[str, Any]]:
    """summary.csv / summary.md of a sweep folder: the given rows, else one per job of its last sweep."""
    sweep_dir = Path(sweep_dir)
    rows = collect_summary(sweep_dir, sweep_jobs(sweep_dir)) if rows is None else rows
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(sweep_dir / "summary.csv", buf.getvalue())
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    write_text_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write summary.csv / summary.md (and a W&B table).

    The summary has one row per job of this sweep (a folder left in the sweep folder by an earlier sweep,
    e.g. one named by other overrides, is not in it): at the start the sweep folder's job list
    (.fewstep_jobs) is emptied, and every job appends its folder when it ends, in whatever process the
    launcher ran it."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(sweep_dir / SWEEP_JOBS_FILE, "")

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        try:
            from hydra.types import RunMode

            if config.hydra.mode != RunMode.MULTIRUN:
                return
            out = Path(str(config.hydra.runtime.output_dir)).resolve()
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not sweep_dir.is_absolute():   # relative to where the sweep was started (hydra.job.chdir may move)
                sweep_dir = Path(str(config.hydra.runtime.cwd)) / sweep_dir
            sweep_dir = sweep_dir.resolve()
            line = f"{int(config.hydra.job.num)}\t{out.relative_to(sweep_dir).as_posix()}\n".encode()
            fd = os.open(sweep_dir / SWEEP_JOBS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)               # one short O_APPEND write: jobs in parallel do not interleave
            finally:
                os.close(fd)
        except Exception as e:  # the summary then falls back to every job folder
            warn(f"sweep job list not updated ({_one_line(e)})")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        jobs = sweep_jobs(sweep_dir)
        rows = write_summary(sweep_dir, collect_summary(sweep_dir, jobs))
        missing = f", {len(jobs) - len(rows)} without a metrics.json" if jobs is not None and len(jobs) > len(rows) else ""
        print(f"[fewstep] sweep summary: {sweep_dir / 'summary.md'} ({len(rows)} jobs{missing})")
        if config.logger.name == "wandb" and rows:
            mode = wandb_mode(config.logger)
            if mode == "disabled":
                return
            run = wandb_init(config.logger, project=config.logger.get("project", "fewstep"), group=sweep_dir.name,
                             mode=mode, dir=str(sweep_dir), name=f"{sweep_dir.name}-summary", job_type="sweep_summary",
                             reinit="finish_previous")
            if run is None:
                return
            try:
                import wandb

                keys = list(dict.fromkeys(k for r in rows for k in r))
                run.log({"summary": wandb.Table(columns=keys, data=[[_fmt(r.get(k, "")) for k in keys] for r in rows])})
                run.finish()
            except (Exception, SystemExit) as e:  # the summary files are the record; W&B is a copy
                warn(f"W&B summary table not logged ({_one_line(e)})")
