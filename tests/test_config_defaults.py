"""One source for every default: the YAML group files under conf/.

Code reads config keys strictly (a key the YAML lacks raises, it never falls back to a default written in
Python), programmatic use composes the same YAML (fewstep.config.compose / group), and the groups'
validators run once per run (tasks.validate), never per batch.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from conftest import CONF, REPO, TINY_OVERRIDES

SRC = REPO / "src" / "fewstep"

# names that hold a config node: cfg, config, cfg_<group>, <group>_cfg (and, per function, what is taken from them)
CONFIG_NAME = re.compile(r"^(cfg|config|cfg_\w+|\w+_cfg)$")


def _root(node):
    """The Name at the root of an attribute / subscript chain (cfg in cfg.task.x, cfg["a"].b), else None."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def config_fallbacks(source: str, filename: str = "<src>") -> list:
    """Every place in `source` that reads a config key with a fallback: a call of `option(...)`, `.get(...)` on
    a config node (its root name is a config name, or a local alias of one such as `t = cfg.task`), a call of
    an alias of a config's bound get (`g = cfg_metrics.get; g("k", 3)`), `getattr(cfg, "k", default)`."""
    found = []
    tree = ast.parse(source, filename)
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    for scope in [tree] + scopes:
        aliases, getters = set(), set()
        body = list(ast.walk(scope))

        def is_cfg(expr):
            r = _root(expr)
            return r is not None and (bool(CONFIG_NAME.match(r)) or r in aliases)

        changed = True
        while changed:   # aliases of aliases (m = cfg.metrics; g = m.get)
            changed = False
            for n in body:
                if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                    name, value = n.targets[0].id, n.value
                    if isinstance(value, ast.Attribute) and value.attr == "get" and is_cfg(value.value):
                        if name not in getters:
                            getters.add(name)
                            changed = True
                    elif isinstance(value, (ast.Attribute, ast.Subscript, ast.Name)) and is_cfg(value) \
                            and name not in aliases and not CONFIG_NAME.match(name):
                        aliases.add(name)
                        changed = True
        for n in body:
            if not isinstance(n, ast.Call):
                continue
            f = n.func
            where = f"{filename}:{n.lineno}"
            if (isinstance(f, ast.Name) and f.id == "option") or (isinstance(f, ast.Attribute) and f.attr == "option"):
                found.append(f"{where}: option(...)")
            elif isinstance(f, ast.Attribute) and f.attr == "get" and is_cfg(f.value):
                found.append(f"{where}: {ast.unparse(f.value)}.get(...)")
            elif isinstance(f, ast.Name) and f.id in getters:
                found.append(f"{where}: {f.id}(...) (a config's get)")
            elif isinstance(f, ast.Name) and f.id == "getattr" and len(n.args) == 3 and is_cfg(n.args[0]):
                found.append(f"{where}: getattr({ast.unparse(n.args[0])}, ..., default)")
    return sorted(set(found))


def test_the_scan_finds_every_form_of_fallback():
    """The scanner itself: each fallback form is found, reads of data that is not a config are not."""
    bad = '''
def f(cfg, cfg_metrics, sampler_cfg):
    a = cfg.get("seed", 0)
    b = option(cfg.cache, "interval", 1)
    c = cfg_metrics.get("feature")
    t = cfg.task
    d = t.get("n_val", 0)
    g = cfg_metrics.get
    e = g("pr_k", 3)
    h = getattr(sampler_cfg, "eta", 0.0)
    i = cfg.task.get("grid_size", 64)
'''
    assert sorted(hit.split(": ", 1)[1] for hit in config_fallbacks(bad)) == sorted([
        "cfg.get(...)", "option(...)", "cfg_metrics.get(...)", "t.get(...)", "g(...) (a config's get)",
        "getattr(sampler_cfg, ..., default)", "cfg.task.get(...)"])
    good = '''
import os
def f(cfg, meta, net_config, info):
    a = meta.get("key", 1)
    b = os.environ.get("WANDB_MODE", "")
    c = (net_config or {}).get("num_class_embeds", None)
    d = self.config.get("image_size", 0)
    e = info.get("image_size")
    f = cfg.task.grid_size
'''
    assert config_fallbacks(good) == []


def test_no_config_read_in_fewstep_has_a_fallback():
    """src/fewstep reads config keys strictly: no option(), no .get(key, default) on a config node."""
    found = [hit for path in sorted(SRC.rglob("*.py"))
             for hit in config_fallbacks(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], "config reads with a fallback default (put the default in conf/ instead):\n" + "\n".join(found)
    import fewstep.config

    assert not hasattr(fewstep.config, "option")


# ---------------------------------------------------------------------------- composing conf/
GROUPS = sorted((g.name, o.stem) for g in CONF.iterdir() if g.is_dir() and g.name != "hydra"
                for o in g.glob("*.yaml"))
PAIRED = {("dataset", "gmm"): ["backbone=gmm_exact"], ("backbone", "gmm_exact"): ["dataset=gmm"]}   # resolve together


@pytest.mark.parametrize("name,opt", GROUPS, ids=[f"{g}={o}" for g, o in GROUPS])
def test_every_group_option_composes_resolved_and_strict(name, opt):
    from fewstep.config import compose, group

    cfg = compose([f"{name}={opt}", *PAIRED.get((name, opt), [])])
    assert OmegaConf.is_struct(cfg) and "hydra" not in cfg
    node = cfg if name == "experiment" else cfg[name]
    if name != "experiment":
        assert node == group(name, opt, context=PAIRED.get((name, opt), []))
    with pytest.raises(ConfigAttributeError):
        node.no_such_key  # noqa: B018  (a key the YAML lacks raises: it never defaults)
    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        node["no_such_key"] = 1


def test_compose_and_group_give_the_yaml_values():
    from fewstep.config import compose, group

    cfg = compose()
    assert cfg.sampler.name == "dpmpp" and cfg.cache.name == "none" and cfg.guidance.name == "none"
    assert not OmegaConf.is_missing(cfg.metrics, "classifier_dir") and "${" not in str(cfg.metrics.classifier_dir)
    assert group("cache", "deepcache", interval=5).interval == 5
    assert group("variance", "analytic", context=["sampler=ddpm"]).clip_pixel == 2.0
    with pytest.raises(ConfigKeyError):
        group("cache", "deepcache", intervall=5)        # a misspelt key is refused, not added
    a = compose(["sampler=ddim"])
    a.sampler.steps = 99                                 # callers get their own copy
    assert compose(["sampler=ddim"]).sampler.steps == OmegaConf.load(CONF / "sampler" / "ddim.yaml").steps


def test_validators_read_strictly():
    """A validator given a node without a key of its YAML raises instead of filling a default in."""
    from omegaconf import open_dict

    from fewstep.config import group
    from fewstep.samplers import validate_sampler_cfg
    from fewstep.strategies.cache import validate_cache_cfg

    for node, key, validator in ((group("sampler", "dpmpp"), "order", validate_sampler_cfg),
                                 (group("cache", "deepcache"), "power", validate_cache_cfg)):
        validator(node)
        with open_dict(node):
            del node[key]
        with pytest.raises((ConfigAttributeError, ConfigKeyError)):
            validator(node)


# ---------------------------------------------------------------------------- the YAML's values are the ones used
def test_deepcache_from_the_config_group_has_the_yaml_values():
    """cache=deepcache builds a DeepCache with conf/cache/deepcache.yaml's values (interval 3, branch 3 when this
    was written; strategies/cache.py used to fall back to 1 / 0)."""
    from fewstep.build import build_denoiser
    from fewstep.config import compose

    yaml = OmegaConf.load(CONF / "cache" / "deepcache.yaml")
    assert (yaml.interval, yaml.branch) == (3, 3)
    model = build_denoiser(compose(["cache=deepcache", *TINY_OVERRIDES, "backbone.config.block_out_channels=[16,32,32]",
                                    "backbone.config.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D]",
                                    "backbone.config.up_block_types=[UpBlock2D,UpBlock2D,UpBlock2D]"]), "cpu")
    c = model.cache
    assert (c.interval, c.branch, c.schedule, c.center, c.power, c.compile, c.compile_backend) == \
        (yaml.interval, yaml.branch, yaml.schedule, yaml.center, yaml.power, yaml.compile, yaml.compile_backend)


def test_feature_batch_is_the_metrics_yaml_value():
    """metrics.feature_batch reaches the Inception extractor as the YAML says (it was 250, 32 and 500 in three places)."""
    from fewstep.config import group
    from fewstep.metrics import build_feature

    yaml = OmegaConf.load(CONF / "metrics" / "inception.yaml")
    assert build_feature(group("metrics", "inception")).max_batch == yaml.feature_batch
    assert build_feature(group("metrics", "inception", feature_batch=7)).max_batch == 7


# ---------------------------------------------------------------------------- validation once
def test_each_validator_runs_once_per_evaluate_run(monkeypatch, tmp_path):
    """python run.py (dispatch) validates the config once, before any work: validate_sampler_cfg and the other
    groups' validators run exactly once for a run of several batches, never per batch or per build."""
    import fewstep.metrics
    import fewstep.parallel
    import fewstep.samplers
    import fewstep.strategies.cache
    import fewstep.strategies.guidance
    import fewstep.strategies.variance
    from fewstep.config import compose
    from fewstep.tasks import dispatch

    calls = {}

    def counting(module, name):
        real = getattr(module, name)

        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **k)

        monkeypatch.setattr(module, name, wrapper)

    counting(fewstep.samplers, "validate_sampler_cfg")
    counting(fewstep.strategies.cache, "validate_cache_cfg")
    counting(fewstep.strategies.guidance, "validate_guidance_cfg")
    counting(fewstep.parallel, "validate_trainer_cfg")
    counting(fewstep.strategies.variance, "validate_variance_cfg")
    monkeypatch.chdir(tmp_path)
    cfg = compose([*TINY_OVERRIDES, "logger=none", "sampler=ddim", "sampler.steps=4", "n_samples=6", "batch_size=2",
                   "cache=deepcache", "cache.interval=2", "cache.branch=1", "variance=fixed"])
    result = dispatch(cfg)
    assert result["n_samples"] == 6 and result["cache"] == "deepcache"       # three batches were sampled
    assert calls == {"validate_sampler_cfg": 1, "validate_cache_cfg": 1, "validate_guidance_cfg": 1,
                     "validate_trainer_cfg": 1}
