"""The one way fewstep replaces a file or a folder: atomically, through a per-process temporary name.

    with atomic_path(out / "x.npz") as tmp:      # a file: write all of it to tmp
        with open(tmp, "wb") as f:
            np.savez(f, ...)
    write_text_atomic(path, text)  /  write_bytes_atomic(path, data)  /  write_json_atomic(path, obj)
    with atomic_dir(export_dir) as tmp:          # a folder: fill tmp, it is swapped in whole
        net.save_pretrained(tmp)

A reader sees the old file (folder) or the whole new one, never a part; two processes or threads writing
the same path never share a temporary name; on an exception the temporary is removed and the target is
left as it was. Standard library only, so any module (safe_io, strategies, benchmarks) can use it without
importing torch, hydra or wandb.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _tmp_name(path: Path, kind: str = "tmp") -> Path:
    """A temporary name next to `path`, unique to this process and thread (two writers never share one)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_native_id()}.{kind}")


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Replace the file `path` atomically:

        with atomic_path(out / "x.npz") as tmp:
            with open(tmp, "wb") as f:          # give np.savez / torch.save / save_file the tmp path or a handle
                np.savez(f, ...)

    Inside, write the whole file to `tmp` (a per-process name next to `path`); on leaving, it is flushed
    to disk and renamed over `path`, so a reader sees the old file or the whole new one, never a part.
    On an exception the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        try:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Replace the folder `path` as a whole: fill `tmp` (a new, empty, per-process folder next to `path`);
    on leaving, an existing `path` is renamed aside, `tmp` renamed to `path` and the old folder removed.
    On an exception `tmp` is removed and `path` is left as it was (put back if it had been moved aside).
    For one writer at a time (e.g. a training run exporting its model): of two concurrent swaps one fails."""
    path = Path(path)
    tmp, old = _tmp_name(path), _tmp_name(path, "old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            path.rename(old)         # a folder cannot be renamed over a non-empty one: move it aside first
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            if path.exists():        # another writer's whole folder is there now: ours is the one that lost
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path, data: bytes) -> Path:
    """`data` as the whole file `path`, through atomic_path."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def write_text_atomic(path, text: str) -> Path:
    """Write through a per-process temporary file and a rename: a reader sees the old file or the whole new one."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def strict_json(obj):
    """obj with every non-finite float (nan, inf: e.g. a metric that could not be computed) as None, so it
    serialises as strict JSON (null), which every JSON reader accepts; numpy / torch scalars become floats."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    try:
        v = float(obj)
    except (TypeError, ValueError):
        return obj
    return v if math.isfinite(v) else None


def write_json_atomic(path: Path, obj) -> Path:
    """Strict JSON (no bare NaN / Infinity: they are written as null), through atomic_path."""
    return write_text_atomic(path, json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False))
