"""Run folders you can trust: the Hydra output folder of a job, its lock, its result and the config behind it.

metrics.json is written after the samples and atomically (`fewstep.fileio.atomic_path`: a per-process tmp
file + rename), so a folder that has one holds a finished result. It carries `config_hash`, the hash of the
resolved config without the keys that cannot change a result (`HASH_IGNORED`: resume, logger, tags, hydra);
`resume=true` skips a job only when that hash is the one of its config now. A run that starts in a folder
first takes the folder's lock (`RunFolder`: a second live process is refused with one line) and moves an
earlier run's result files aside (`move_results_aside`: metrics.json -> metrics.json.prev-<time>).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from .config import ConfigError
from .fileio import write_json_atomic, write_text_atomic

METRICS_FILE = "metrics.json"


def output_dir() -> Path:
    """The Hydra output folder of this job (the cwd outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path(os.getcwd())


JOB_CONFIG_DIR = ".hydra"


def save_job_config(cfg, out: Path) -> None:
    """Hydra's record of a job, `.hydra/config.yaml` (the task config as composed, unresolved),
    `hydra.yaml` and `overrides.yaml`, written by fewstep (conf/config.yaml sets hydra.output_subdir: null)
    after the run folder's lock is held, so a process that is refused never rewrites the record of the
    run that owns the folder. Outside a Hydra job (Python, tests) there is nothing to record."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:
        return
    d = Path(out) / JOB_CONFIG_DIR
    d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(d / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(d / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_text_atomic(d / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


LOCK_FILE = ".fewstep.lock"
RESULT_CONFIG_FILE = "metrics.config.json"   # the hashed config of the metrics.json beside it (says what changed)
# what an earlier run left as its result: moved aside (renamed <name>.prev-<time>) when a new run starts
RESULT_FILES = (METRICS_FILE, RESULT_CONFIG_FILE, "metrics.csv", "samples.png", "samples.npz", "features.npz",
                "nll_bpd.npz")
# top-level config keys that cannot change a result: left out of the config hash
HASH_IGNORED = ("resume", "logger", "tags", "hydra")
# task keys that name where outputs and caches go (task=tune_rho's rho file and teacher cache), not what
# they hold: left out too
HASH_IGNORED_TASK = ("out", "cache_dir", "teacher_cache")


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock."""


def hashed_config(cfg) -> Dict[str, Any]:
    """The resolved config that decides a result: everything but HASH_IGNORED (resume, logger, tags, hydra)
    and the task's output and cache locations (HASH_IGNORED_TASK).
    cfg: a config, or a plain dict (e.g. what this returned before: it comes back unchanged)."""
    try:
        c = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    except Exception:  # an interpolation that only resolves inside a Hydra job: hash it as written
        c = OmegaConf.to_container(cfg, resolve=False)
    c = {k: v for k, v in c.items() if k not in HASH_IGNORED}
    if isinstance(c.get("task"), dict):
        c["task"] = {k: v for k, v in c["task"].items() if k not in HASH_IGNORED_TASK}
    return c


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


@dataclass
class Claim:
    """A run folder claimed by `claim_run_folder`: the hashed config taken at the start (give it to
    write_result), and `done`, the earlier result of this same config when resume=true found one."""

    hashed: Dict[str, Any]
    done: Optional[Dict[str, Any]] = None


@contextmanager
def claim_run_folder(cfg, out: Path, writer: bool = True, tag: str = "fewstep"):
    """The start of every task that leaves a result in a run folder: take the folder's lock (the writing
    process only; a second live one is refused: RunFolderBusy), with resume=true look for a result of this
    same config (Claim.done: then the task returns it and does nothing), else move earlier results aside.
    The lock is held until the block ends."""
    out = Path(out)
    claim = Claim(hashed_config(cfg))
    lock = RunFolder(out).acquire() if writer else None
    try:
        if cfg.resume:
            done, why = finished_result(claim.hashed, out)
            if done is not None:
                print(f"[{tag}] resume: {out / METRICS_FILE} was made by this config "
                      f"(config_hash {done['config_hash']}), nothing to do")
                claim.done = done
            elif why:
                print(f"[{tag}] resume: re-running {out}: {why}")
        if writer and claim.done is None:
            moved = move_results_aside(out)
            if moved:
                print(f"[{tag}] earlier results in {out} moved aside: {', '.join(moved)}")
            save_job_config(cfg, out)
        yield claim
    finally:
        if lock is not None:
            lock.release()
