"""What run.py can do: one module per task (fewstep.tasks.<name>), each with `run(cfg) -> dict`.

`dispatch` validates the user's input first (one clear line, exit code 2, before any model is built),
then runs the task. Errors that come from the user's environment (a missing dataset or checkpoint) are
also reported as one line.
"""
from __future__ import annotations

import importlib
import sys

from ..config import ConfigError, check

SAMPLING_TASKS = ("evaluate", "skip_norms", "tune_rho")


def validate(cfg) -> None:
    """Cheap checks of everything the user can mistype; raises ValueError with one line."""
    check(int(cfg.n_samples) >= 1, f"n_samples must be >= 1 (got {cfg.n_samples})")
    check(int(cfg.batch_size) >= 1, f"batch_size must be >= 1 (got {cfg.batch_size})")
    if cfg.get("save_features", False):
        m = cfg.metrics
        check(bool(m.get("fid", False)), f"save_features=true needs feature metrics (metrics={m.name} has none)")
        cap = int(m.get("pr_max_fake", 10000))
        check(int(cfg.n_samples) <= cap, f"save_features=true keeps at most metrics.pr_max_fake={cap} rows "
                                          f"(got n_samples={cfg.n_samples}): raise metrics.pr_max_fake")
    from ..denoiser import autocast_dtype

    autocast_dtype(cfg.get("autocast", None))
    from ..parallel import validate_trainer_cfg
    from ..samplers import validate_sampler_cfg

    validate_trainer_cfg(cfg.trainer)

    validate_sampler_cfg(cfg.sampler)
    if cfg.backbone.name == "uvit" and not cfg.backbone.get("pretrained"):
        from ..backbones.uvit import check_uvit_config

        c = cfg.backbone.config
        check_uvit_config(int(c.sample_size), int(c.patch_size), int(c.embed_dim), int(c.depth), int(c.num_heads))
    skip = cfg.skip
    for key in ("rho_top", "rho_bottom"):
        if key in skip:
            check(float(skip[key]) >= 0, f"skip.{key} must be >= 0 (got {skip[key]})")
    if cfg.variance.name != "fixed":
        from ..strategies.variance import validate_variance_cfg

        validate_variance_cfg(cfg.variance, cfg.sampler)
    if cfg.cache.name != "none":
        from ..strategies.cache import validate_cache_cfg

        validate_cache_cfg(cfg.cache)


def fail(msg: str) -> None:
    print(f"fewstep: error: {msg}", file=sys.stderr)
    sys.exit(2)


def dispatch(cfg):
    from ..data.datasets import DatasetMissing

    name = cfg.task.name
    try:
        module = importlib.import_module(f"fewstep.tasks.{name}")
    except ModuleNotFoundError:
        fail(f"unknown task '{name}'")
    try:
        if name in SAMPLING_TASKS or cfg.task.get("validate", False):
            validate(cfg)
    except ValueError as e:
        fail(str(e))
    try:
        return module.run(cfg)
    except (ConfigError, DatasetMissing) as e:
        fail(str(e))
