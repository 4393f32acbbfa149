"""Logging a job: one W&B run per job (offline by default), a csv file, or nothing; one module for every logger.

Logging is a copy of the results, never a condition for them: metrics.json and the samples are written
before any logger starts, and every W&B failure (no API key, no network, an error inside wandb) is one
warning line on stderr, with the run going on and exiting 0.

Every W&B run of fewstep starts from the same settings: `wandb_settings(cfg)` (project, group, name, folder,
mode, config of this job) and `wandb_sdk_settings(cfg.logger)` (a short init_timeout), behind the same gate
(`wandb_may_start`: mode disabled -> nothing; online without an API key -> one warning line). Two front
ends use them: `RunLogger` for the tasks that log one result (evaluate, skip_norms) and `make_loggers`
for the Lightning tasks (train, tune_rho).
"""
from __future__ import annotations

import csv
import functools
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from .config import first_line, warn
from .fileio import atomic_path
from .run_folder import output_dir

WANDB_KEYLESS_MODES = ("offline", "dryrun", "disabled")


def _one_line(e: BaseException) -> str:
    msg = first_line(e, "").strip()
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def wandb_mode(cfg_logger) -> str:
    """WANDB_MODE in the environment wins over logger.mode (conf/logger/wandb.yaml: offline)."""
    return str(os.environ.get("WANDB_MODE") or cfg_logger.mode)


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


def wandb_may_start(mode: str) -> bool:
    """The gate before every W&B run: no for mode disabled (silently), and for a mode that needs an API key
    when there is none (one warning line, `wandb_skip_reason`)."""
    if mode == "disabled":
        return False
    reason = wandb_skip_reason(mode)
    if reason:
        warn(reason)
        return False
    return True


def wandb_sdk_settings(cfg_logger):
    """The wandb.Settings of every fewstep run: init_timeout = logger.init_timeout (conf/logger/wandb.yaml)."""
    import wandb

    return wandb.Settings(init_timeout=float(cfg_logger.init_timeout))


def wandb_init(cfg_logger, **kwargs):
    """wandb.init(**kwargs) behind `wandb_may_start`, with `wandb_sdk_settings`; None (and at most one warning
    line) instead of any failure."""
    if not wandb_may_start(kwargs.get("mode", "offline")):
        return None
    try:
        import wandb

        return wandb.init(settings=wandb_sdk_settings(cfg_logger), **kwargs)
    except (Exception, SystemExit) as e:
        warn(f"W&B logging skipped: wandb.init failed ({_one_line(e)}); the results are in the run folder")
        return None


def wandb_settings(cfg) -> Dict[str, Any]:
    """This job's W&B run, as wandb.init keyword arguments: project, group (logger.group, else the sweep
    folder's name in a multirun), mode (`wandb_mode`), dir and name (the job's output folder), the resolved
    config. The one description both `RunLogger` and `make_loggers` start their run from."""
    lg = cfg.logger
    out = output_dir()
    group = lg.group or (out.parent.name if _is_multirun() else None)
    return dict(project=lg.project, group=group, mode=wandb_mode(lg), dir=str(out),
                name=out.name, config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


# the calls Lightning makes on a logger during fit; a failing one must not end the training
_LIGHTNING_LOGGER_CALLS = ("log_metrics", "log_hyperparams", "log_graph", "log_image", "after_save_checkpoint",
                           "save", "finalize")


@functools.lru_cache(maxsize=None)
def fail_soft_wandb_logger():
    """Lightning's WandbLogger whose every call made during fit (log_metrics, log_hyperparams, log_image,
    after_save_checkpoint, save, finalize) is fail-soft: the first W&B failure is one warning line, then
    the logger goes quiet and the training goes on (its checkpoints, exports and progress log are the
    result; W&B only mirrors them)."""
    from lightning.pytorch.loggers import WandbLogger

    def fail_soft(name):
        method = getattr(WandbLogger, name)

        def call(self, *args, **kwargs):
            if self._fewstep_failed:
                return None
            try:
                return method(self, *args, **kwargs)
            except (Exception, SystemExit) as e:
                self._fewstep_failed = True
                warn(f"W&B logging failed in {name} ({_one_line(e)}); training goes on, W&B stops for this run")
                return None

        call.__name__ = name
        return call

    return type("FailSoftWandbLogger", (WandbLogger,),
                {"_fewstep_failed": False, **{n: fail_soft(n) for n in _LIGHTNING_LOGGER_CALLS}})


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
    if not wandb_may_start(mode):
        return []
    try:  # Lightning's WandbLogger starts the run, from the same settings as RunLogger
        logger = fail_soft_wandb_logger()(project=s["project"], group=s["group"], save_dir=s["dir"],
                                               name=s["name"], offline=mode in ("offline", "dryrun"),
                                               config=s["config"], mode=mode, settings=wandb_sdk_settings(cfg.logger))
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
            self.run = wandb_init(cfg.logger, **wandb_settings(cfg))

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


def finish_loggers(loggers: List) -> None:
    """Finish the W&B runs of make_loggers' loggers that started one: one W&B run per job (a Lightning
    logger's run is not wandb.run, so wandb.finish() would not end it)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish()


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
