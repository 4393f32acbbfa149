"""cache=block: DeepCache for a plain stack of transformer blocks (backbone=dit).

DeepCache (Ma, Fang, Wang, CVPR 2024, arXiv 2312.00858) reuses, across adjacent sampling steps, the
high-level feature a UNet's deep path produces. A DiT has no such U-shape; what changes slowly from step to
step is what its middle blocks add to the token stream. With blocks B_0 .. B_{L-1} and (first, last) = (m, n):

    full call     h_m = B_{m-1}(...B_0(tokens(x)))   delta = B_{L-n-1}(...B_m(h_m)) - h_m   (cached)
                  then B_{L-n} .. B_{L-1} and the head                     (= the plain forward, bit for bit)
    partial call  h_m as above (recomputed at the new x_t, t),  h = h_m + delta_cached,
                  then B_{L-n} .. B_{L-1} and the head

so a partial call costs the m + n recomputed blocks (and the tokens and head) instead of L. Which calls are
full is DeepCache's 1:N rule exactly (`cache.DeepCache`: uniform every N, or the non-uniform eq. 5 schedule
with `center` and `power`; this class inherits its schedule, planning and row/batch bookkeeping, so CFG's
doubled batch caches both rows and a call whose batch changes is full). MACs are counted per call kind
("full", "partial@<m>+<n>").

What it follows: the caching of a residual over a span of blocks is the form shared by FORA (Selvaraju et
al. 2024, arXiv 2407.01425: reuse of attention / MLP outputs every N steps), Delta-DiT (Chen et al. 2024,
arXiv 2406.01125: caching the deviation h_out - h_in of a span of blocks; front blocks recomputed in late
steps) and diffusers' first-block cache (diffusers.hooks.FirstBlockCacheConfig / apply_first_block_cache,
after ParaAttention's FBCache: recompute block 0 and reuse the residual of the rest when block 0's residual
barely moved, an adaptive rule; here the rule is DeepCache's fixed schedule). m = 1, n = 0 is FBCache's split with a fixed schedule; n > 0 also refreshes the last blocks,
which write the output, as DeepCache's shallow decoder layers do.

Residual hooks (skip=residual) act at full and partial calls alike; at a partial call those of the middle
blocks are baked into the cached residual, as DeepCache bakes the skip hooks of its skipped deep layers.

U-ViT's in and out blocks are tied by long skips, so a middle span cannot be cached without its skips:
cache=deepcache (branch m) is the U-ViT form and cache=block refuses it.
"""
from __future__ import annotations

import functools
from typing import Optional

from ..config import ConfigError, check
from .cache import DeepCache, _is_int, validate_cache_cfg

BLOCK_CACHE_BACKBONES = ("dit",)


def validate_block_cache_cfg(cfg) -> None:
    """cache=block from the config alone (tasks.validate): DeepCache's schedule keys, first / last, backbone."""
    c = cfg.cache
    backbone = str(cfg.backbone.name)
    check(backbone in BLOCK_CACHE_BACKBONES,
          f"cache=block reuses the middle of a plain stack of transformer blocks (backbone=dit); backbone={backbone} "
          f"has none: use cache=deepcache" + (" (its branch m is the U-ViT form: the long skips tie in and out "
                                               "blocks)" if backbone == "uvit" else ""))
    schedule_keys = {k: c[k] for k in ("interval", "schedule", "center", "power", "compile")}
    try:
        validate_cache_cfg(dict(name="deepcache", branch=0, **schedule_keys))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("first", "last"):
        check(_is_int(c[key]) and int(c[key]) >= 0, f"cache.{key} must be an integer >= 0 (blocks recomputed at a "
                                                    f"partial call); got {c[key]}")
    if not cfg.backbone.pretrained:
        L = int(cfg.backbone.config.num_layers)
        check(int(c.first) + int(c.last) <= L - 1,
              f"cache.first + cache.last must leave at least one middle block to cache: 0 <= first + last <= {L - 1} "
              f"for backbone.config.num_layers={L} (got first={c.first}, last={c.last})")


def require_block_forwards(backbone) -> None:
    if not all(hasattr(backbone, a) for a in ("num_blocks", "forward_block_full", "forward_block_partial")):
        raise ValueError(f"cache=block needs a plain stack of transformer blocks (backbone=dit); got "
                         f"{type(backbone).__name__}: use cache=deepcache")


class BlockCache(DeepCache):
    """Callable cache strategy: ``cache(backbone, x, t_batch, **cond) -> (out, kind)``, kind "full" or
    "partial@<first>+<last>"; DeepCache's schedule (`plan`, `is_full`, `reset`) and call bookkeeping."""

    def __init__(self, interval: int, first: int, last: int, schedule: str = "uniform", center: Optional[int] = None,
                 power: float = 1.4, compile: bool = False, compile_backend: str = "inductor",
                 num_blocks: Optional[int] = None):
        if num_blocks is not None:
            from ..backbones.dit import check_blocks

            check_blocks((first, last), num_blocks)
        self.blocks = (int(first), int(last))
        super().__init__(interval, 0, schedule, center, power, compile, compile_backend)
        self.kind_partial = f"partial@{self.blocks[0]}+{self.blocks[1]}"

    def __repr__(self):
        return (f"BlockCache(interval={self.interval}, first={self.blocks[0]}, last={self.blocks[1]}, "
                f"schedule={self.schedule}, center={self.center}, power={self.power}, compile={self.compile})")

    def with_interval(self, interval: int, schedule: Optional[str] = None) -> "BlockCache":
        """Another cache with the same blocks, its own state and schedule, sharing this one's forwards."""
        other = BlockCache(interval, *self.blocks, schedule or self.schedule, self.center, self.power, self.compile,
                           self.compile_backend)
        other._fns = self._fns
        return other

    def _eager_forwards(self, backbone):
        require_block_forwards(backbone)
        return (functools.partial(backbone.forward_block_full, blocks=self.blocks),
                functools.partial(backbone.forward_block_partial, blocks=self.blocks))


def block_cache(adapter, *, interval, first, last, schedule, center, power, compile, compile_backend) -> Optional[BlockCache]:
    """cache=block (conf/cache/block.yaml) -> a BlockCache on `adapter`, or None at interval 1 (every call full)."""
    if int(interval) == 1:
        return None
    require_block_forwards(adapter)
    return BlockCache(interval=int(interval), first=int(first), last=int(last), schedule=str(schedule),
                      center=center, power=float(power), compile=bool(compile), compile_backend=str(compile_backend),
                      num_blocks=adapter.num_blocks)
