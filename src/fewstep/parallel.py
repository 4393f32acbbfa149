"""Multi-process work with Lightning Fabric: launch the ranks, split the sample indices, gather results.

    python run.py trainer=ddp trainer.devices=8 trainer.num_nodes=2      # GPUs (NCCL)
    python run.py trainer=ddp_cpu trainer.devices=2                       # CPU processes (gloo)

`run_parallel(cfg.trainer, fn, *args)` runs ``fn(dist, *args)`` on every rank, where `dist` is a
`Dist` (rank, world, device). How the ranks come to exist:

* SLURM (``srun``, the submitit launcher with tasks_per_node = trainer.devices), torchrun, LSF, MPI:
  the cluster already started one process per device; Fabric reads the rank from the environment
  and ``fabric.launch()`` only joins the process group. Every process runs fn.
* Anywhere else (a shell, a Hydra multirun, a notebook, pytest): Fabric starts
  trainer.devices processes on this node with torch.multiprocessing ``spawn`` and runs fn in
  each. Lightning's default for strategy "ddp" ("popen": re-execute the command line once per
  rank) is replaced by spawn here, because re-executing ``run.py -m ...`` would re-run a whole
  Hydra sweep, and there is no command line to re-execute in pytest or a notebook.
  trainer.strategy = ddp_spawn / ddp_fork / ddp_notebook are passed to Fabric unchanged.

The return value: fn returns its payload on global rank 0 and None elsewhere; `run_parallel`
hands back, in the calling process, whatever global rank 0 returned if rank 0 ran in (or was
spawned by) this process, else None. So exactly one process in the whole job receives the
payload, and it is the only one that should write files or log.

Collectives (`gather_by_index`, `all_gather`) are no-ops for a single process, so the same code
runs with and without torch.distributed.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch

from .fileio import atomic_path


@dataclass
class Dist:
    """This process's place in the job. world == 1: no process group (plain single process)."""

    rank: int = 0
    world: int = 1
    device: Optional[torch.device] = None

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_fabric(cls, fabric) -> "Dist":
        return cls(int(fabric.global_rank), int(fabric.world_size), fabric.device)

    @classmethod
    def from_process_group(cls) -> "Dist":
        import torch.distributed as dist

        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), dev)


SINGLE = Dist()


# ---------------------------------------------------------------------------- config
def _devices(cfg_trainer):
    from omegaconf import OmegaConf

    devices = cfg_trainer.devices
    return OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices


def is_multiprocess(cfg_trainer) -> bool:
    """True for a ddp strategy, more than one device, or more than one node (conf/trainer/ddp*.yaml)."""
    devices = _devices(cfg_trainer)
    nodes = int(cfg_trainer.num_nodes)
    strategy = str(cfg_trainer.strategy)
    many = (isinstance(devices, int) and (devices > 1 or devices == -1)) or \
        (isinstance(devices, (list, tuple)) and len(devices) > 1) or (isinstance(devices, str) and devices not in ("1", "auto"))
    return nodes > 1 or strategy.startswith("ddp") or many


def validate_trainer_cfg(cfg_trainer) -> None:
    """One-line ValueError for impossible trainer settings, before anything is launched."""
    devices = _devices(cfg_trainer)
    nodes = cfg_trainer.num_nodes
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ValueError(f"trainer.num_nodes must be an integer >= 1 (got {nodes!r})")
    ok = (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)) or \
        (isinstance(devices, (list, tuple)) and len(devices) >= 1) or (isinstance(devices, str) and devices != "")
    if not ok:
        raise ValueError(f"trainer.devices must be an integer >= 1, -1 (all), a list of device ids or 'auto' "
                         f"(got {devices!r})")


def make_fabric(cfg_trainer):
    """-> (Fabric, external) for a multi-process trainer config; external = the cluster started the ranks."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    kw = dict(accelerator=str(cfg_trainer.accelerator), devices=_devices(cfg_trainer),
              num_nodes=int(cfg_trainer.num_nodes))
    strategy = str(cfg_trainer.strategy)
    if strategy in ("ddp", "auto"):
        fabric = Fabric(strategy="ddp", **kw)
        if fabric.strategy.cluster_environment.creates_processes_externally:
            return fabric, True
        return Fabric(strategy=DDPStrategy(start_method="spawn"), **kw), False
    fabric = Fabric(strategy=strategy, **kw)
    env = getattr(fabric.strategy, "cluster_environment", None)
    return fabric, bool(env is not None and env.creates_processes_externally)


def _close_process_group() -> None:
    """Wait for every rank, then tear the process group down while the interpreter is still whole.

    A gloo group left to interpreter shutdown can abort its process ("terminate called without an
    active exception", SIGABRT): its worker threads still hold work objects whose destruction needs
    the interpreter being torn down. A spawned rank is about to exit, so nothing needs the group after fn.
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def _spawned_entry(fabric, out_file: str, fn, *args) -> bool:
    # Fabric hands rank 0's return value to the parent through a pipe that the parent reads only after
    # every rank has exited: anything over the pipe's buffer (64 kB: a grid of 28 x 28 images) would block
    # rank 0 in its write forever. So global rank 0 pickles the value into a file (pickle.dump copies
    # tensor data; sending tensors themselves would share them through file descriptors of this process,
    # which is gone by the time the parent reads) and the pipe only carries whether it did.
    result = fn(Dist.from_fabric(fabric), *args)
    _close_process_group()
    if fabric.global_rank != 0:
        return False
    with atomic_path(out_file) as tmp, open(tmp, "wb") as f:
        pickle.dump(result, f)
    return True


def run_parallel(cfg_trainer, fn: Callable[..., Any], *args) -> Any:
    """Run fn(dist, *args) on every rank of a multi-process trainer config (see the module docstring).

    fn and args must be picklable (a module-level function; configs as plain containers or DictConfig).
    Returns global rank 0's return value in the process that hosts or spawned it, None elsewhere.
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():  # the caller already set up the process group
        return fn(Dist.from_process_group(), *args)
    from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    fabric, external = make_fabric(cfg_trainer)
    launcher = getattr(fabric.strategy, "launcher", None)
    if external or launcher is None or isinstance(launcher, _SubprocessScriptLauncher):
        fabric.launch()
        return fn(Dist.from_fabric(fabric), *args)
    with tempfile.TemporaryDirectory(prefix="fewstep-ranks-") as tmp:
        out_file = os.path.join(tmp, "rank0.pkl")
        if not fabric.launch(_spawned_entry, out_file, fn, *args):
            return None
        with open(out_file, "rb") as f:
            return pickle.load(f)


# ---------------------------------------------------------------------------- splitting
def shard(n: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The global sample indices of this rank: a contiguous block (np.array_split of 0..n-1).

    Contiguous blocks (not a stride) keep every gathered quantity in global index order: torchmetrics
    concatenates list states rank by rank, so rank 0's rows come first, exactly as in one process.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1 (got rank={rank}, world={world})")
    return np.array_split(np.arange(int(n)), world)[rank]


# ---------------------------------------------------------------------------- collectives
def all_gather(obj, dist: Dist) -> List[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if dist.world == 1:
        return [obj]
    import torch.distributed as tdist

    out = [None] * dist.world
    tdist.all_gather_object(out, obj)
    return out


def gather_by_index(x: torch.Tensor, indices: Sequence[int], dist: Dist, keep: Optional[int] = None):
    """Rows x[j] of global index indices[j] from every rank -> one tensor on rank 0, in global index order
    (None on other ranks). keep: send only the rows with global index < keep (e.g. the grid)."""
    idx = np.asarray(indices, dtype=np.int64)
    if keep is not None:
        sel = idx < keep
        x, idx = x[torch.from_numpy(sel)], idx[sel]
    if dist.world == 1:
        order = np.argsort(idx, kind="stable")
        return x[torch.from_numpy(order)]
    import torch.distributed as tdist

    parts = [None] * dist.world if dist.is_global_zero else None
    tdist.gather_object((idx, x.cpu()), parts, dst=0)
    if not dist.is_global_zero:
        return None
    idx = np.concatenate([p[0] for p in parts])
    x = torch.cat([p[1] for p in parts])
    order = np.argsort(idx, kind="stable")
    return x[torch.from_numpy(order)]


