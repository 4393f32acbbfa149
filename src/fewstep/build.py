"""Config -> objects: schedule, backbone (+ strategies), denoiser.

Data flows one way: config -> task -> (data, denoiser(backbone + strategies), sampler) -> metrics -> logger.
This module is the only place that knows how config groups map onto classes.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch

from .config import ConfigError, user_errors, warn
from .denoiser import Denoiser
from .schedule import NoiseSchedule


def resolve_device(name: str = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_schedule(cfg_schedule) -> NoiseSchedule:
    return NoiseSchedule.from_config(cfg_schedule.kind, int(cfg_schedule.n), float(cfg_schedule.beta_start),
                                     float(cfg_schedule.beta_end))


# backbone.name -> the network class and the adapter that walks it (skip hooks, partial forwards)
NETWORKS = {
    "unet": ("diffusers", "UNet2DModel", "fewstep.backbones.unet", "UNetAdapter"),
    "uvit": ("fewstep.backbones.uvit", "UViT", "fewstep.backbones.uvit", "UViTAdapter"),
    "dit": ("diffusers", "DiTTransformer2DModel", "fewstep.backbones.dit", "DiTAdapter"),
}


def _network(name: str):
    if name not in NETWORKS:
        raise ConfigError(f"backbone '{name}' is not a trainable network (choose from {', '.join(NETWORKS)})")
    mod, cls, amod, acls = NETWORKS[name]
    return getattr(importlib.import_module(mod), cls), getattr(importlib.import_module(amod), acls)


def load_pretrained(pretrained: str, subfolder=None, name: str = "unet"):
    """<Network>.from_pretrained from a local folder, or from the local hub cache (never downloads)."""
    cls = _network(name)[0]
    # without accelerate, diffusers' default low_cpu_mem_usage=True only warns and falls back: ask for it directly
    kw = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    path = Path(os.path.expanduser(str(pretrained)))
    if path.exists():
        if not (path / (subfolder or "") / "config.json").exists():
            raise ConfigError(f"backbone.pretrained={pretrained}: no config.json in that folder "
                              f"(expected a {cls.__name__} save_pretrained folder)")
        try:
            return cls.from_pretrained(str(path), subfolder=subfolder, **kw)
        except Exception as e:  # a truncated or foreign weights file, a config.json of another class
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"backbone.pretrained={pretrained}: not a loadable {cls.__name__} folder "
                              f"({type(e).__name__}: {first[:200]})") from None
    looks_local = str(pretrained).startswith((".", "/", "~")) or str(pretrained).count("/") != 1
    if looks_local:
        raise ConfigError(f"backbone.pretrained={pretrained}: folder not found")
    try:
        return cls.from_pretrained(str(pretrained), subfolder=subfolder, local_files_only=True, **kw)
    except Exception:
        raise ConfigError(f"backbone.pretrained={pretrained}: hub id could not be reached (nothing downloads at run "
                          f"time); download it on a machine with internet and pass backbone.pretrained=/local/folder") from None


def network_kwargs(cfg_config) -> dict:
    """backbone.config -> constructor kwargs (lists become tuples, as diffusers expects)."""
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(cfg_config, resolve=True) if not isinstance(cfg_config, dict) else cfg_config
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def new_network(name: str, config: dict):
    """A freshly initialized network of backbone `name` from its config kwargs."""
    try:
        net = _network(name)[0](**network_kwargs(config))
    except ValueError as e:  # the constructors' own shape checks (e.g. a patch size that does not divide)
        raise ConfigError(f"backbone={name}: {e}") from None
    if name == "dit":  # labels are dropped by task.label_dropout, not at random in each block's embedding
        from .backbones.dit import no_builtin_label_dropout

        no_builtin_label_dropout(net)
    return net


def build_network(cfg_backbone):
    """The plain network of cfg.backbone: loaded from `pretrained`, else built from `config`."""
    name = str(cfg_backbone.name)
    if cfg_backbone.pretrained:
        return load_pretrained(cfg_backbone.pretrained, cfg_backbone.subfolder, name)
    warn(f"backbone={name} has no backbone.pretrained: sampling a randomly initialised network")
    return new_network(name, cfg_backbone.config)


def adapt(name: str, network):
    """Wrap a plain network in the adapter the strategies act on (UNetAdapter, UViTAdapter)."""
    return _network(name)[1](network)


def build_backbone(cfg):
    """The backbone module the denoiser calls: an adapter (UNet2DModel, U-ViT) or GMMExact."""
    schedule = build_schedule(cfg.backbone.schedule)
    name = cfg.backbone.name
    if name in NETWORKS:
        return adapt(name, build_network(cfg.backbone).eval()), schedule
    if name == "gmm_exact":
        from .backbones.gmm import GMMExact
        from .data import build_mixture

        if cfg.dataset.name != "gmm":
            raise ConfigError(f"backbone=gmm_exact needs dataset=gmm (got dataset={cfg.dataset.name})")
        return GMMExact(build_mixture(cfg.dataset), schedule), schedule
    if name == "sd_unet":   # a Stable Diffusion pipeline folder: the adapter also carries its VAE and prompts
        from .pipelines import build_sd_backbone

        return build_sd_backbone(cfg)
    raise ConfigError(f"unknown backbone '{name}'")


def install_strategies(cfg, backbone):
    """Skip hooks onto the adapter; returns the cache strategy (or None). Each group's option names its
    builder (`_target_`, config.instantiate)."""
    from .strategies.cache import build_cache
    from .strategies.skip import build_skip

    hooks = build_skip(cfg.skip, backbone)
    if hooks:   # skip=residual scales the residual branches of transformer blocks (DiT, U-ViT), the others the long skips
        (backbone.residual_hooks if cfg.skip.name == "residual" else backbone.skip_hooks).extend(hooks)
    return build_cache(cfg.cache, backbone)


def class_embeds(cfg_backbone) -> int | None:
    """How many class embeddings the configured network has (classes + 1: the last is the null class of
    classifier-free guidance), or None for an unconditional one; read from the config (backbone.config,
    or the pretrained folder's config.json) without building the network."""
    name = str(cfg_backbone.name)
    if name not in CLASS_EMBEDS:
        return None
    if cfg_backbone.pretrained:
        import json

        path = Path(os.path.expanduser(str(cfg_backbone.pretrained))) / (cfg_backbone.subfolder or "") / "config.json"
        conf = json.loads(path.read_text()) if path.exists() else {}
    else:
        conf = cfg_backbone.config
    return class_embeds_of(name, conf)


CLASS_EMBEDS = {"unet": "num_class_embeds", "uvit": "num_classes", "dit": "num_embeds_ada_norm"}   # backbone -> its config key
NULL_ROW_ADDED = {"dit": 1}   # DiT's key counts the classes only: its label table adds the null class itself


def class_embeds_of(name: str, net_config) -> int | None:
    """The class-embedding count in a network's own config (its config.json, or backbone.config) of backbone
    `name` (None: unconditional; an older config.json may lack the key)."""
    n = (net_config or {}).get(CLASS_EMBEDS.get(name, ""), None)
    return int(n) + NULL_ROW_ADDED.get(name, 0) if n else None


def build_denoiser(cfg, device=None) -> Denoiser:
    """The configured network with its strategies installed; a config that does not fit the network (a
    cache branch it lacks, a rho file of another model, an unreadable checkpoint) is a ConfigError."""
    from .strategies.guidance import build_guidance

    device = device or resolve_device(cfg.device)
    with user_errors():
        backbone, schedule = build_backbone(cfg)
        backbone.requires_grad_(False)
        cache = install_strategies(cfg, backbone)
    # the built network's own config decides (validation read it from the config beforehand, best effort)
    n_embeds = class_embeds_of(str(cfg.backbone.name), dict(getattr(backbone, "config", None) or {}))
    guidance = build_guidance(cfg.guidance)
    return Denoiser(backbone, schedule, cfg.backbone.parameterization, cache=cache,
                    autocast=cfg.autocast, guidance=guidance,
                    null_label=None if n_embeds is None else n_embeds - 1,
                    null_cond=getattr(backbone, "null_cond", None)).to(device)


def explicit_timesteps(cfg_sampler, variance):
    """The trajectory a task hands its sampler when the config names one made outside it:
    timesteps=analytic_dp -> the Analytic-DPM rule's dynamic programme (variance.dp_timesteps); else None
    (the sampler lays out its own spacing)."""
    from .samplers import names_analytic_dp

    if not names_analytic_dp(cfg_sampler):
        return None
    if not hasattr(variance, "dp_timesteps"):
        raise ConfigError("sampler.timesteps=analytic_dp is the Analytic-DPM optimal trajectory: it needs "
                          "variance=analytic")
    return variance.dp_timesteps(int(cfg_sampler.steps))


def sample_shape(cfg) -> tuple:
    if cfg.dataset.name == "gmm":
        return (int(cfg.dataset.dim),)
    if cfg.backbone.name == "sd_unet":   # the sampler's state is the latent of a dataset.image_size image
        from .pipelines import latent_shape

        return latent_shape(cfg)
    return (int(cfg.dataset.channels), int(cfg.dataset.image_size), int(cfg.dataset.image_size))
