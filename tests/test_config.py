"""Every option of every config group composes, and instantiates the object it stands for."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, compose_cfg, make_tiny_unet
from fewstep.config import group

GROUPS = ("dataset", "backbone", "sampler", "skip", "cache", "variance", "metrics", "logger", "trainer", "task",
          "experiment")
PAIRED = {  # options that only make sense together with another choice
    ("backbone", "gmm_exact"): ["dataset=gmm"],
    ("dataset", "image_folder"): ["dataset.root=/tmp"],
}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), f"config group {g} is empty"
    assert {"none", "linear", "freeu", "learned"} <= set(options("skip"))
    assert {"none", "deepcache"} <= set(options("cache"))
    assert {"fixed", "analytic"} <= set(options("variance"))
    assert {"ddpm", "ddim", "dpmpp", "euler", "heun", "diffusers"} <= set(options("sampler"))


def _adapter():
    from fewstep.backbones.unet import UNetAdapter

    return UNetAdapter(make_tiny_unet())


def _dit_adapter():
    """skip=residual and cache=block act on transformer blocks: a tiny DiT."""
    from diffusers import DiTTransformer2DModel

    from fewstep.backbones.dit import DiTAdapter

    return DiTAdapter(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=3,
                                            sample_size=8, num_embeds_ada_norm=3))


@pytest.mark.parametrize("group,option", ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes_and_instantiates(group, option, tmp_path, request):
    overrides = [f"{group}={option}"] + PAIRED.get((group, option), [])
    if (group, option) in (("dataset", "prompts"), ("backbone", "sd_unet")):   # text-to-image: the two go together
        (tmp_path / "prompts.txt").write_text("a photo of the cat\n")
        overrides += ["dataset=prompts", "backbone=sd_unet", f"dataset.path={tmp_path / 'prompts.txt'}",
                      f"backbone.pretrained={request.getfixturevalue('tiny_sd_folder')}"]
    if group == "skip" and option == "learned":
        from fewstep.strategies.skip import save_learned_rho
        from fewstep.strategies.variance import model_id

        path = tmp_path / "rho.yaml"
        save_learned_rho(path, torch.linspace(0.6, 1.0, _adapter().num_skips), meta={"model_id": model_id(_adapter())})
        overrides.append(f"skip.path={path}")
    cfg = compose_cfg(overrides)
    node = cfg[group] if group != "experiment" else cfg
    assert node is not None
    if group == "dataset" and option == "prompts":
        from fewstep.data.prompts import read_prompts

        assert read_prompts(cfg.dataset) == ["a photo of the cat"]
    elif group == "dataset":
        from fewstep.data import dataset_shape

        shape = dataset_shape(cfg.dataset)
        assert all(int(s) >= 1 for s in shape)
    elif group == "backbone":
        from fewstep.build import build_backbone

        if option == "unet":
            cfg.backbone.pretrained = None  # random weights: the shipped model is tested in test_default_run
        backbone, schedule = build_backbone(cfg)
        assert schedule.N == 1000 and isinstance(backbone, torch.nn.Module)
    elif group == "sampler":
        from fewstep.samplers import validate_sampler_cfg

        validate_sampler_cfg(cfg.sampler)
    elif group == "skip":
        from fewstep.strategies.skip import build_skip

        hooks = build_skip(cfg.skip, _dit_adapter() if option == "residual" else _adapter())
        assert isinstance(hooks, list)
    elif group == "cache":
        from fewstep.strategies.cache import build_cache, validate_cache_cfg

        if option == "block":
            from fewstep.strategies.block_cache import validate_block_cache_cfg

            validate_block_cache_cfg(compose_cfg(["cache=block", "backbone=dit"]))
            assert build_cache(cfg.cache, _dit_adapter()) is not None
        elif option != "none":
            validate_cache_cfg(cfg.cache)
            assert build_cache(cfg.cache, _adapter()) is not None or int(cfg.cache.interval) == 1
    elif group == "variance":
        from fewstep.schedule import NoiseSchedule
        from fewstep.strategies.variance import build_variance

        if option == "fixed":
            assert build_variance(cfg.variance, NoiseSchedule.from_config(), "x") is None
        else:  # no Gamma exists for a model id nobody trained: the error names the command that makes one
            cfg.sampler.name = "ddpm"
            with pytest.raises(Exception, match="task=gamma"):
                build_variance(cfg.variance, NoiseSchedule.from_config(), "0000000000000000")
    elif group == "metrics":
        assert "fid" in cfg.metrics and "name" in cfg.metrics
        if cfg.metrics.fid and cfg.metrics.get("feature") == "classifier":
            from fewstep.metrics import Metrics

            m = Metrics(cfg.metrics, cfg.dataset, torch.device("cpu"))
            m.update(torch.rand(8, 1, 28, 28) * 2 - 1)
    elif group == "logger":
        from fewstep.outputs import RunLogger

        import os

        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            lg = RunLogger(cfg)
            lg.log({"x": 1.0})
            lg.finish()
        finally:
            os.chdir(cwd)
    elif group == "trainer":
        assert {"accelerator", "devices", "num_nodes", "strategy"} <= set(cfg.trainer)
        if cfg.trainer.accelerator == "cpu":
            import lightning as L

            L.Trainer(accelerator="cpu", devices=1, strategy="auto", logger=False, enable_progress_bar=False)
    elif group == "task":
        import importlib

        mod = importlib.import_module(f"fewstep.tasks.{cfg.task.name}")
        assert callable(mod.run)


STRATEGY_GROUPS = ("skip", "cache", "variance", "guidance")


@pytest.mark.parametrize("group_name,option", [(g, o) for g in STRATEGY_GROUPS for o in options(g)])
def test_strategy_option_names_its_builder(group_name, option):
    """Each strategy option's YAML is the argument list of the builder its _target_ names: the same keys
    (besides name), and the builder has no defaults of its own, so every default exists once, in the YAML."""
    import inspect

    from hydra.utils import get_object

    node = OmegaConf.to_container(group(group_name, option, context=["sampler=ddpm"]))
    assert "_target_" in node
    if node["_target_"] is None:   # the option that builds nothing
        assert set(node) == {"name", "_target_"}
        return
    params = inspect.signature(get_object(node["_target_"])).parameters
    kw_only = {n: p for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(kw_only) == set(node) - {"name", "_target_"}
    assert all(p.default is p.empty for p in kw_only.values())


@pytest.mark.parametrize("target,match", [
    ("os.system", "may only name a fewstep builder"),
    ("fewstep.build.os.system", "not a fewstep builder"),      # an attribute path out of the package
    ("fewstep.strategies.skip.__import__('os')", "may only name a fewstep builder"),
    ("fewstep.strategies.skip.nope", "no such builder"),
    ("fewstep.strategies.skip.freeu", "are not the builder's arguments"),   # linear's keys, freeu's builder
])
def test_instantiate_refuses_foreign_targets(target, match, monkeypatch):
    import os

    from fewstep.config import ConfigError, instantiate

    ran = []
    monkeypatch.setattr(os, "system", lambda *a: ran.append(a))
    with pytest.raises(ConfigError, match=match):
        instantiate(group("skip", "linear", _target_=target, rho_bottom=0.5), adapter=None)
    assert ran == []


def test_instantiate_builds_nothing_for_a_null_target():
    from fewstep.config import instantiate

    assert instantiate(group("cache", "none")) is None and instantiate(group("guidance", "none")) is None
    g = instantiate(group("guidance", "cfg", scale=2.0, interval=[100, 700]))
    assert (g.scale, g.interval, g.rescale) == (2.0, (100.0, 700.0), 0.0)
