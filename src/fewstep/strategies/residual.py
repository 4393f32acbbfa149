"""skip=residual: Skip-Tuning for transformers, on the residual branches of their blocks.

A DiT has no long skips; its identity paths are the residual additions of each block,

    h <- h + r_attn(h),   h <- h + r_mlp(h)       (for a DiT, r after the adaLN-Zero gate)

The Skip-Tuning seed (Ma et al., ICML 2024, arXiv 2402.15170) leaves open whether these can be tuned like a
UNet's skips. `skip=residual` multiplies the residual branch r_i by rho_i before it is added to the stream,
with the linear rule of skip=linear (`skip.skip_scales`) laid over the blocks in execution order:

    granularity block:   rho_b = rho_bottom + b (rho_top - rho_bottom) / (L - 1),   b = 0 .. L - 1
                         (both branches of block b get rho_b)
    granularity branch:  the same rule over the scaled branches themselves, in execution order

b = 0 is the BOTTOM of the stack (the first block, next to the patch embedding), b = L - 1 the top (the last
block, next to the output head); this is the transformer reading of "bottom" and "top", not the UNet's
"deepest skip". `branches` (both | attn | mlp) picks the branches that are scaled; the others keep 1.
`t_range` and `rows` behave as for skip=linear. All rho = 1 installs no hook at all: the plain network.

Backbones: DiT (`DiTAdapter`, L = num_layers) and U-ViT (`UViTAdapter`: its depth blocks in execution order,
in blocks, mid block, out blocks; its long skips stay those of skip=linear). The hooks are those of
`skip.ScaleSkips` on the adapter's `residual_hooks` (signature hook(i, r, h, t) -> (r, h), i the branch
index); task=skip_norms records ||r_i|| / ||h|| (branch over the stream it is added to) per branch and step.
"""
from __future__ import annotations

from typing import List

from ..config import ConfigError, check
from .skip import ScaleSkips, parse_t_range, restrict_rows, skip_scales

GRANULARITIES = ("block", "branch")
BRANCHES = ("both", "attn", "mlp")
RESIDUAL_BACKBONES = ("dit", "uvit")


def residual_scales(num_blocks: int, rho_top: float = 1.0, rho_bottom: float = 1.0, granularity: str = "block",
                    branches: str = "both") -> List[float]:
    """rho of each residual branch, by branch index i = 2 b (attention) / 2 b + 1 (MLP)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown skip.granularity '{granularity}' for skip=residual (choose from "
                         f"{', '.join(GRANULARITIES)})")
    if branches not in BRANCHES:
        raise ValueError(f"unknown skip.branches '{branches}' (choose from {', '.join(BRANCHES)})")
    kinds = ("attn", "mlp")
    chosen = [2 * b + j for b in range(num_blocks) for j, k in enumerate(kinds) if branches in ("both", k)]
    if granularity == "block":
        per_block = skip_scales(num_blocks, rho_top, rho_bottom, "skip")
        values = {i: per_block[i // 2] for i in chosen}
    else:
        values = dict(zip(chosen, skip_scales(len(chosen), rho_top, rho_bottom, "skip")))
    return [values.get(i, 1.0) for i in range(2 * num_blocks)]


def validate_residual_cfg(cfg) -> None:
    """skip=residual and the backbone, from the config alone (tasks.validate); one ConfigError line.

    Also refuses the long-skip strategies on a DiT, which has no long skips."""
    skip, backbone = cfg.skip, str(cfg.backbone.name)
    if skip.name != "residual":
        if backbone == "dit" and skip.name in ("linear", "freeu", "learned") and not (
                skip.name == "linear" and float(skip.rho_top) == 1.0 and float(skip.rho_bottom) == 1.0):
            raise ConfigError(f"backbone=dit has no long skips for skip={skip.name}: skip=residual scales the residual "
                              f"branches of its blocks")
        return
    check(backbone in RESIDUAL_BACKBONES,
          f"skip=residual scales the attention and MLP residual branches of transformer blocks (backbone=dit or "
          f"uvit); backbone={backbone} has none: use skip=linear or skip=freeu on its skip connections")
    for key in ("rho_top", "rho_bottom"):
        check(float(skip[key]) >= 0, f"skip.{key} must be >= 0 (got {skip[key]})")
    check(skip.granularity in GRANULARITIES, f"unknown skip.granularity '{skip.granularity}' for skip=residual "
                                             f"(choose from {', '.join(GRANULARITIES)})")
    check(skip.branches in BRANCHES, f"unknown skip.branches '{skip.branches}' (choose from {', '.join(BRANCHES)})")
    check(skip.rows in ("both", "cond"), f"skip.rows must be both or cond (got {skip.rows})")
    try:
        parse_t_range(skip.t_range)
    except ValueError as e:
        raise ConfigError(f"skip.{e}") from None


def require_residuals(adapter) -> None:
    if not getattr(adapter, "residuals", None) or not hasattr(adapter, "residual_hooks"):
        raise ValueError(f"skip=residual needs a backbone with transformer residual branches (backbone=dit or "
                         f"uvit); {type(adapter).__name__} has none")


def residual(adapter, *, rho_top, rho_bottom, granularity, branches, t_range, rows) -> list:
    """skip=residual (conf/skip/residual.yaml): hooks to append to `adapter.residual_hooks`; [] when every
    rho is 1."""
    t_range = parse_t_range(t_range)
    require_residuals(adapter)
    scales = residual_scales(len(adapter.residuals) // 2, float(rho_top), float(rho_bottom), str(granularity),
                             str(branches))
    if all(s == 1.0 for s in scales):
        return []
    return restrict_rows([ScaleSkips(scales, t_range)], rows, adapter)
