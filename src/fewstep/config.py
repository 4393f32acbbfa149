"""Config helpers: the `${repo:...}` resolver and up-front validation of user input."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_path(rel: str = "") -> str:
    """Absolute path of `rel` inside the fewstep checkout (configs use ${repo:checkpoints/...})."""
    return str(REPO_ROOT / rel) if rel else str(REPO_ROOT)


# Analytic-DPM's cap on the last step's sigma, per sampler, as the official FID runs set it (CIFAR-10,
# linear schedule): 2 for DDPM, 1 for DDIM. Resolved when the config is built (conf/variance/analytic.yaml:
# clip_pixel: ${analytic_clip_pixel:${sampler.name}}), so the variance rule gets a number and never
# looks at the sampler.
ANALYTIC_CLIP_PIXEL = {"ddpm": 2.0, "ddim": 1.0}


def analytic_clip_pixel(sampler: str):
    return ANALYTIC_CLIP_PIXEL.get(str(sampler))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", repo_path)
    if not OmegaConf.has_resolver("analytic_clip_pixel"):
        OmegaConf.register_new_resolver("analytic_clip_pixel", analytic_clip_pixel)


register_resolvers()


class ConfigError(ValueError):
    """Invalid user input; the message is one line meant for the command line."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def option(cfg, key: str, default):
    """cfg.key with a default, for DictConfig / dict / None alike (a null value gives the default too)."""
    if cfg is None:
        return default
    value = cfg.get(key, default)
    return default if value is None else value


@contextmanager
def user_errors(where: str = ""):
    """Inside: building objects from the user's config (a checkpoint, a cache branch, a rho file, a
    classifier folder). A ValueError or a missing file there is the user's input not fitting the model: it
    leaves as a ConfigError, so the command line prints one line and exits 2."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}{msg}") from None
