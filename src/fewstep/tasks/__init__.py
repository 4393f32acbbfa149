"""What run.py can do: one module per task (fewstep.tasks.<name>), each with `run(cfg) -> dict`.

`dispatch` validates the user's input first (one clear line, exit code 2, before any model is built),
then runs the task. Errors that come from the user's environment (a missing dataset or checkpoint) are
also reported as one line.
"""
from __future__ import annotations

import importlib
import math
import sys

from omegaconf import OmegaConf

from ..config import ConfigError, check, first_line

SAMPLING_TASKS = ("evaluate", "skip_norms", "tune_rho", "denoise_loss")


def _whole(cfg, key: str, lo: int, prefix: str = "") -> int:
    """cfg[key] as an integer >= lo; a float (1.5, or even 2.0), a bool or a string is refused, never truncated.
    prefix: the node's path in the messages ("task." for cfg.task)."""
    v = cfg[key]
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"{prefix}{key} must be an integer >= {lo} (got {v!r})")
    return v


def check_finite_options(node, prefix: str = "") -> None:
    """Every number anywhere in the config must be finite: inf / nan are refused, naming the option."""
    from omegaconf import DictConfig, ListConfig

    items = (node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node))
    for k, _ in items:
        key = f"{prefix}{k}" if isinstance(node, DictConfig) else f"{prefix[:-1]}[{k}]."
        if isinstance(node, DictConfig) and OmegaConf.is_missing(node, k):
            continue
        v = node[k]
        if isinstance(v, (DictConfig, ListConfig)):
            check_finite_options(v, f"{key}." if isinstance(node, DictConfig) else key)
        elif isinstance(v, float) and not math.isfinite(v):
            check(False, f"{key.rstrip('.')} must be a finite number (got {v})")


def check_options(cfg) -> None:
    """The checks every task shares, sampling or not: every number finite (hydra's own node aside) and the
    seed a non-negative 64-bit integer."""
    check_finite_options(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg)
    seed = cfg.seed
    check(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2 ** 63,
          f"seed must be an integer in 0..2^63-1 (got {seed!r})")


def image_metrics(cfg) -> bool:
    """Whether the run computes feature metrics (FID, P/R, IS). metrics=default is the dataset's default:
    the feature metrics for images, the exact mixture checks (metrics=gmm) for dataset=gmm, where an
    explicit image metric is refused."""
    m = cfg.metrics
    if not m.fid:
        return False
    if cfg.dataset.name == "gmm":
        check(m.name == "default", f"metrics={m.name} measures images; dataset=gmm takes metrics=gmm "
                                   f"(exact mixture checks)")
        return False
    return True


def validate_conditioning(cfg, n_train: int) -> None:
    """labels and guidance against the network's class embeddings (read from its config, nothing built)."""
    from ..build import class_embeds
    from ..conditions import check_labels
    from ..strategies.guidance import require_conditional, validate_guidance_cfg

    g = cfg.guidance
    validate_guidance_cfg(g, n_train)
    if cfg.backbone.name == "sd_unet":   # text-conditional: guidance's unconditional row is the negative prompt
        return
    n_embeds = class_embeds(cfg.backbone)
    if g.name != "none":
        require_conditional(n_embeds, f"guidance={g.name}")
    if n_embeds is not None:
        check(n_embeds >= 2, f"a class-conditional network needs its classes plus a null class (got {n_embeds} "
                             f"class embeddings)")
        check_labels(cfg.labels, n_embeds - 1)


def validate(cfg) -> None:
    """Cheap checks of everything the user can mistype, from the config alone; raises ConfigError (one line).

    The one place where the groups' validators run (sampler, trainer, metrics, skip, guidance, variance,
    cache), once per run and before any work: the builders take the validated config as it is. Keys are
    read strictly: every default is in conf/ (a key the YAML lacks raises, it never defaults)."""
    check_options(cfg)
    n = _whole(cfg, "n_samples", 1)
    _whole(cfg, "batch_size", 1)
    seed = cfg.seed
    m = cfg.metrics
    if image_metrics(cfg):
        from ..metrics import check_metrics_cfg, min_samples

        check_metrics_cfg(m)
        need = min_samples(m)
        check(n >= need, f"n_samples={n} is too few for metrics={m.name}: it needs at least {need} "
                         f"(precision/recall k+1 = {int(m.pr_k) + 1}, IS splits = {m.is_splits})")
    if image_metrics(cfg) and m.paired_with and cfg.task.name == "evaluate":
        from ..metrics import check_paired_with

        cap = int(m.pr_max_fake)
        check(n <= cap, f"metrics.paired_with needs every feature row (at most metrics.pr_max_fake={cap}, "
                        f"got n_samples={n}): raise metrics.pr_max_fake")
        check_paired_with(m, cfg.dataset, n, seed)
    if cfg.save_features:
        check(bool(m.fid), f"save_features=true needs feature metrics (metrics={m.name} has none)")
        cap = int(m.pr_max_fake)
        check(n <= cap, f"save_features=true keeps at most metrics.pr_max_fake={cap} rows "
                        f"(got n_samples={n}): raise metrics.pr_max_fake")
    from ..denoiser import autocast_dtype

    autocast_dtype(cfg.autocast)
    from ..parallel import validate_trainer_cfg
    from ..samplers import VARIANCE_SAMPLERS, names_analytic_dp, validate_sampler_cfg

    validate_trainer_cfg(cfg.trainer)

    validate_sampler_cfg(cfg.sampler)
    n_train = int(cfg.backbone.schedule.n)
    check(int(cfg.sampler.steps) <= n_train,
          f"sampler.steps must be <= the {n_train} training timesteps of the backbone (got {cfg.sampler.steps})")
    if cfg.backbone.name == "uvit" and not cfg.backbone.pretrained:
        from ..backbones.uvit import check_uvit_config

        c = cfg.backbone.config
        check_uvit_config(int(c.sample_size), int(c.patch_size), int(c.embed_dim), int(c.depth), int(c.num_heads))
    if cfg.backbone.name == "dit" and not cfg.backbone.pretrained:
        from ..backbones.dit import check_dit_config

        c = cfg.backbone.config
        check_dit_config(int(c.sample_size), int(c.in_channels), c.out_channels, int(c.patch_size), int(c.num_layers),
                         int(c.num_attention_heads), int(c.attention_head_dim), c.num_embeds_ada_norm)
    from ..strategies.residual import validate_residual_cfg

    validate_residual_cfg(cfg)   # skip=residual (transformer residual branches) and long skips on a DiT
    skip = cfg.skip
    for key in ("rho_top", "rho_bottom"):
        if key in skip:
            check(float(skip[key]) >= 0, f"skip.{key} must be >= 0 (got {skip[key]})")
    if skip.name == "learned":
        from ..strategies.skip import load_learned

        check(bool(skip.path), "skip=learned needs skip.path=<rho file written by task=tune_rho>")
        load_learned(skip.path)   # the file's form and values; its model is checked when the backbone is built
    if skip.name != "none":   # skip=none has no hooks, so no rows to choose
        check(skip.rows in ("both", "cond"), f"skip.rows must be both or cond (got {skip.rows})")
    from ..pipelines import validate_text_cfg

    validate_text_cfg(cfg)              # text-to-image: backbone=sd_unet with dataset=prompts
    validate_conditioning(cfg, n_train)
    check(not names_analytic_dp(cfg.sampler) or cfg.variance.name == "analytic",
          "sampler.timesteps=analytic_dp is the Analytic-DPM optimal trajectory: it needs variance=analytic")
    if cfg.variance.name != "fixed":
        from ..strategies.variance import validate_variance_cfg

        check(cfg.sampler.name in VARIANCE_SAMPLERS,
              f"variance={cfg.variance.name} sets the reverse variance of {' and '.join(VARIANCE_SAMPLERS)}; "
              f"sampler={cfg.sampler.name} has none to set")
        validate_variance_cfg(cfg.variance)
    if cfg.cache.name == "block":
        from ..strategies.block_cache import validate_block_cache_cfg

        validate_block_cache_cfg(cfg)
    elif cfg.cache.name != "none":
        from ..strategies.cache import validate_cache_cfg

        check(cfg.backbone.name != "dit", f"cache={cfg.cache.name} caches a UNet / U-ViT skip branch; backbone=dit "
                                          f"has none: use cache=block (its middle blocks' residual)")
        validate_cache_cfg(cfg.cache)


def fail(msg: str) -> None:
    """The command line's one error line, `fewstep: error: <msg>`, and exit 2. A message of several lines (an
    exception's text, e.g. omegaconf's key / type / value block) is cut to its first (config.first_line)."""
    print(f"fewstep: error: {first_line(msg, 'invalid input')}", file=sys.stderr)
    sys.exit(2)


def dispatch(cfg):
    from ..data.datasets import DatasetMissing
    from ..denoiser import NonFiniteSamples

    name = cfg.task.name
    try:
        module = importlib.import_module(f"fewstep.tasks.{name}")
    except ModuleNotFoundError:
        fail(f"unknown task '{name}'")
    try:
        if name in SAMPLING_TASKS:
            validate(cfg)
        else:   # a pipeline folder and a prompt file only sample: no training, no Gamma over data images
            from ..pipelines import check_text_task

            check_options(cfg)
            check_text_task(cfg)
    except ValueError as e:
        fail(str(e))
    if name not in SAMPLING_TASKS:   # the sampling tasks record it once they hold their run folder
        from ..run_folder import output_dir, save_job_config

        save_job_config(cfg, output_dir())
    try:
        return module.run(cfg)
    except (ConfigError, DatasetMissing, NonFiniteSamples) as e:
        fail(str(e))
