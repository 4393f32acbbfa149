"""Who a file belongs to: content hashes of a network (`model_id`) and of a noise schedule (`schedule_id`).

Files made for one model (Gamma, learned rho, teacher caches) carry these ids, and a reader refuses a file
whose id is not the one of the model (schedule) it runs."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from .schedule import NoiseSchedule


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def model_id(module: nn.Module) -> str:
    """Content hash of a network: sha1 over its state_dict tensors (shape, dtype, bytes), first 16 hex.

    Names are not hashed, so a wrapper with the same weights in the same order (UNetAdapter(unet) vs
    unet) has the same id. Parameter-free exact models (GMMExact) are identified by the tensors of the
    plain objects they hold as attributes (the mixture's means, stds, weights).
    """
    h = hashlib.sha1()
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(_tensor_bytes(t))
    for m in module.modules():
        for name in sorted(vars(m)):
            obj = vars(m)[name]
            if name.startswith("_") or isinstance(obj, (nn.Module, torch.Tensor)) or not hasattr(obj, "__dict__"):
                continue
            for key in sorted(vars(obj)):
                t = vars(obj)[key]
                if isinstance(t, torch.Tensor):
                    h.update(f"{type(obj).__name__}.{key}{tuple(t.shape)}{t.dtype}".encode())
                    h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


def schedule_id(schedule: NoiseSchedule) -> str:
    """Hash of alpha_bar: Gamma depends on the noise schedule as well as on the network."""
    return hashlib.sha1(np.ascontiguousarray(schedule.alpha_bar, dtype=np.float64).tobytes()).hexdigest()[:16]
