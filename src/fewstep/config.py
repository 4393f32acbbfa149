"""Config helpers: the `${repo:...}` resolver, the conf/ tree for Python use (`compose`, `group`) and
up-front validation of user input.

One source for every default: the YAML group files under conf/ (what `python run.py --cfg job` prints).
Code reads config keys strictly (`cfg.key`, struct mode: a key the YAML lacks raises, it never silently
defaults); tests, notebooks and benchmarks get their configs from the same files through `compose` / `group`.

The strategy groups (skip, cache, variance, guidance) are read by `instantiate`: each option's YAML names
the builder it is the arguments of (`_target_: fewstep.strategies.skip.linear`), the builder's signature
lists exactly those keys with no defaults of its own, and a new option is one YAML file and one function.
"""
from __future__ import annotations

import copy
import functools
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


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


def warn(msg: str) -> None:
    """One warning line on stderr, in the form of the command line's errors (`fewstep: warning: <msg>`)."""
    print(f"fewstep: warning: {msg}", file=sys.stderr, flush=True)


def first_line(text, default: str) -> str:
    """The first line of a message for the one-line command-line output (an exception's text may have several,
    e.g. omegaconf's key / type / value block); default when it is empty."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else default


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@functools.lru_cache(maxsize=64)
def _composed(overrides: tuple, config_name: str, resolve: bool) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    outer = gh.hydra if gh.is_initialized() else None     # composing from inside a running Hydra app
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
    if resolve:
        OmegaConf.resolve(cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg


def compose(overrides: Sequence[str] = (), config_name: str = "config", resolve: bool = True) -> DictConfig:
    """The config `python run.py <overrides>` sees (Hydra's compose API on the repo's conf/), without the
    hydra node; resolved (no interpolations left) unless resolve=False, struct mode on (reading or setting a
    key the YAML lacks raises)."""
    return copy.deepcopy(_composed(tuple(overrides), config_name, bool(resolve)))


def group(name: str, option: str, /, *, context: Sequence[str] = (), **values) -> DictConfig:
    """One config group option as run.py composes it, e.g. `group("cache", "deepcache", interval=5)`:
    conf/<name>/<option>.yaml (its defaults list and interpolations resolved against the default config,
    or against `context` overrides such as ["sampler=ddpm"]), with `values` set on top. A value for a key
    the YAML lacks raises (struct mode). `name` and `option` are positional: `values` may set a key `name`."""
    cfg = compose([f"{name}={option}", *context], resolve=False)
    node = OmegaConf.create(OmegaConf.to_container(cfg[name], resolve=True))   # resolved against the whole config
    OmegaConf.set_struct(node, True)
    for key, value in values.items():
        node[key] = value
    return node


TARGET_PREFIX = "fewstep."   # the only callables a config may name


def _locate(target: str):
    """The object a dotted path names: the longest importable module prefix, then attributes (as Hydra's
    locate, without its error log)."""
    import importlib

    parts = target.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        try:
            for attr in parts[k:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"_target_={target}: no such builder")


def instantiate(node, /, **context):
    """A config group option -> its object: `node._target_(**context, **node's other keys)`, as Hydra's
    non-recursive instantiate, with `name` left out (it names the option for validation and the results).
    `_target_: null` is the option that builds nothing (skip=none, cache=none, variance=fixed,
    guidance=none): None. `context` carries what the config cannot know (the adapter, the schedule). A
    target outside fewstep (a crafted or mistyped config) is refused in one line before anything is
    imported; the builder's own errors propagate unchanged."""
    keys = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if "_target_" not in keys:
        raise ConfigError(f"config option {keys.get('name', keys)!r} names no _target_ (the builder of its keys)")
    target = keys.pop("_target_")
    keys.pop("name", None)
    if target is None:
        return None
    check(isinstance(target, str) and target.startswith(TARGET_PREFIX)
          and all(part.isidentifier() for part in target.split(".")),
          f"_target_={target}: a config may only name a fewstep builder ({TARGET_PREFIX}...)")
    builder = _locate(target)
    # fewstep.<module>.os.system resolves too: the object itself must be defined in fewstep
    check(callable(builder) and str(getattr(builder, "__module__", "")).startswith(TARGET_PREFIX),
          f"_target_={target}: not a fewstep builder")
    import inspect

    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        wanted = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        check(set(keys) == wanted, f"_target_={target}: the option's keys {sorted(keys)} are not the builder's "
                                   f"arguments {sorted(wanted)}")
    return builder(**context, **keys)


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
        msg = first_line(e, type(e).__name__)
        raise ConfigError(f"{where}{msg}") from None
