"""Compute cost of a sampling run: network evaluations (NFE) and multiply-accumulates (MACs) per sample.

MACs are counted by torch.utils.flop_counter.FlopCounterMode on a batch-1 call
(MACs = FLOPs / 2: it counts 2 FLOPs per multiply-add of matmuls, convolutions and
attention; elementwise ops, norms and activations are not counted, as in the usual
"MACs" of papers). Attention is counted through the math path of scaled_dot_product_attention
(`attention_as_matmuls`): the fused CPU kernels are invisible to FlopCounterMode, so without it a
network's attention would count as free in some calls and not in others. A Denoiser records how many batched calls of each kind a run made
(`model.calls`: "full", and e.g. "partial@m" for DeepCache); every batched call
processes each sample once, so

    NFE per sample  = sum_kind calls[kind]
    MACs per sample = sum_kind calls[kind] * MACs(kind)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode


def attention_as_matmuls():
    """Run scaled_dot_product_attention as its two matmuls, so that FlopCounterMode counts attention (it
    does not see the fused CPU kernels); every MACs count in fewstep is taken inside it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@torch.no_grad()
def count_macs(fn: Callable, *args, **kwargs) -> int:
    """MACs of one call fn(*args, **kwargs) (FLOPs / 2 as counted by FlopCounterMode), attention included."""
    with attention_as_matmuls(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() // 2


@torch.no_grad()
def full_and_partial_macs(full: Callable, partial: Callable) -> tuple:
    """MACs of a cache's two call kinds, run once each: `full()` returns (output, cache) and
    `partial(cache)` reuses that cache (DeepCache's and the block cache's `measure_macs`)."""
    with attention_as_matmuls():
        with FlopCounterMode(display=False) as fc:
            _, cache = full()
        full_macs = fc.get_total_flops() // 2
        with FlopCounterMode(display=False) as fc:
            partial(cache)
        return full_macs, fc.get_total_flops() // 2


def macs_per_call(backbone, x_example: torch.Tensor, cache=None, t: Optional[float] = None, **cond) -> dict:
    """kind -> MACs per sample of one backbone call: "full" = backbone(x, t) on one sample of x_example.

    If `cache` (a cache strategy object) has `measure_macs(backbone, x)` returning a dict of its own
    kinds (e.g. {"full@m": ..., "partial@m": ...}), it is merged in. `t` is the timestep used for the
    measurement (default 0; a UNet's cost does not depend on it). cond: the condition of that one sample
    (class_labels of shape (1,)) for a conditional network."""
    x1 = x_example[:1]
    t1 = torch.full((1,), float(t or 0.0), dtype=torch.float32, device=x1.device)
    macs = {"full": count_macs(backbone, x1, t1, **cond)}
    if cache is not None and hasattr(cache, "measure_macs"):
        extra = cache.measure_macs(backbone, x1, **cond)
        if extra:
            macs.update({str(k): int(v) for k, v in extra.items()})
    return macs
