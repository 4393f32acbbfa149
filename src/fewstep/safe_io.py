"""Files fewstep writes and reads back (Gamma, its partial sums, teacher caches): safetensors, never a pickle.

Unpickling runs whatever code the file names (torch.load with weights_only=False, pickle.load), and these
files are looked up in folders the user does not fully control (a downloaded model folder, a cache folder
with predictable file names). A safetensors file is a JSON header plus raw tensor bytes; reading it
executes nothing. Everything that is not a tensor goes into the header's string metadata as JSON:

    metadata = {"fewstep": <kind>, "meta": json.dumps(meta)}

`load_tensors` refuses, with one line (ConfigError), any file that is not a safetensors file of that kind;
a pickle of the earlier formats (torch.save) is named as such and never unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from .config import ConfigError
from .fileio import write_bytes_atomic

KIND_KEY = "fewstep"


class UnsafeFile(ConfigError):
    """A file that fewstep will not load: not a safetensors file of the expected kind (e.g. a pickle)."""


def jsonable(obj):
    """`obj` as it comes back from the JSON metadata (tuples -> lists, other objects -> str): compare keys
    with what a file holds."""
    return json.loads(json.dumps(obj, default=str))


def is_pickle(path) -> bool:
    """True for a torch.save zip archive or a raw pickle (protocol >= 2), by their first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def check_plain_checkpoint(path) -> None:
    """Refuse (UnsafeFile, one line) a torch.save file that `torch.load(weights_only=True)` cannot read: a
    training checkpoint holds tensors, numbers, strings and containers only, so one that names any other
    object (a class, a function to call) is a crafted or foreign file and is never unpickled. The file is
    read once here, before Lightning loads it, whatever weights_only default the installed versions use."""
    import pickle

    path = Path(path)
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnsafeFile(f"{path} is not a plain checkpoint (tensors and containers only), so it is not "
                         f"loaded: unpickling it could run code ({first[:160]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise UnsafeFile(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None


def save_tensors(path, tensors: Dict[str, torch.Tensor], kind: str, meta: dict) -> Path:
    """Write tensors + JSON metadata as one safetensors file, atomically (`fileio.write_bytes_atomic`).

    Serialised in memory and written with open(), so the file gets the usual umask permissions (safetensors'
    save_file creates it 0600)."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.as_tensor(v).detach().cpu().contiguous().clone() for k, v in tensors.items()}
    blob = save(tensors, metadata={KIND_KEY: kind, "meta": json.dumps(meta, default=str)})
    return write_bytes_atomic(path, blob)


def load_tensors(path, kind: str, remake: str = "") -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a file written by `save_tensors` with this kind; anything else is an UnsafeFile.

    remake: how to make a good file (e.g. "re-estimate it with `python run.py task=gamma ...`"), the end of
    the one-line error.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    tail = f": {remake}" if remake else ""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        if path.is_file() and is_pickle(path):
            raise UnsafeFile(f"{path} is a pickle (the earlier torch.save format), which fewstep does not load "
                             f"because unpickling can run code{tail}") from None
        raise UnsafeFile(f"{path} is not a fewstep {kind} file (safetensors){tail}") from None
    if header.get(KIND_KEY) != kind:
        raise UnsafeFile(f"{path} is not a fewstep {kind} file (its metadata says {header.get(KIND_KEY)!r}){tail}")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError:
        raise UnsafeFile(f"{path}: unreadable metadata of a fewstep {kind} file{tail}") from None
    return tensors, meta
