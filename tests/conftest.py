"""Shared fixtures: a tiny random UNet2DModel and Hydra composition of conf/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import fewstep.config  # noqa: E402,F401  (registers ${repo:...})


def _lightning_logs_to_pytest() -> None:
    """Lightning's loggers ("lightning", and "lightning.fabric" / "lightning.pytorch" when the root logger has no
    handler yet) get a logging.StreamHandler when first imported, bound to whatever sys.stderr is then. Imported
    inside a test, that is the test's capture stream, closed when the test ends: a later test's Lightning log
    (seed_everything's "Seed set to 0") then prints "--- Logging error --- ValueError: I/O operation on closed
    file" to that test's stderr. So import Lightning here, once, and send its records to the root logger (pytest's
    log capture, shown under "Captured log") instead of to a stream."""
    import logging

    import lightning  # noqa: F401  (imports lightning.fabric and lightning.pytorch)

    for name in ("lightning", "lightning.fabric", "lightning.pytorch"):
        log = logging.getLogger(name)
        for h in [h for h in log.handlers if type(h) is logging.StreamHandler]:
            log.removeHandler(h)
        log.propagate = True


_lightning_logs_to_pytest()

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

TINY_UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                 attention_head_dim=8)


def make_tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET, **overrides}).eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


# the exact Gaussian mixture (closed-form eps) shared by the sampler and Analytic-DPM tests
@pytest.fixture(scope="module")
def schedule():
    from fewstep.schedule import NoiseSchedule

    return NoiseSchedule.from_config("linear", 1000)


@pytest.fixture(scope="module")
def mixture():
    from fewstep.backbones.gmm import GaussianMixture

    return GaussianMixture(dim=2, n_components=8)


@pytest.fixture(scope="module")
def model(mixture, schedule):
    from fewstep.backbones.gmm import GMMExact
    from fewstep.denoiser import Denoiser

    return Denoiser(GMMExact(mixture, schedule), schedule)


def compose_cfg(overrides=()):
    """The config `python run.py <overrides>` sees, unresolved as Hydra hands it to a job (fewstep.config.compose)."""
    from fewstep.config import compose

    return compose(list(overrides), resolve=False)


def group_cfg(name: str, values: dict):
    """conf/<name>/<values["name"]>.yaml with `values` on top (fewstep.config.group): every key the YAML has, so
    a test states only what it is about. A name without a YAML (to test its refusal) starts from the group's
    first option."""
    from fewstep.config import group

    values = dict(values)
    option = values["name"]
    if not (CONF / name / f"{option}.yaml").is_file():
        option = sorted(f.stem for f in (CONF / name).glob("*.yaml"))[0]
    return group(name, option, **values)


@pytest.fixture
def compose():
    return compose_cfg


# a tiny UNet config usable from the command line / compose (backbone built from config, random weights)
TINY_OVERRIDES = [
    "backbone.pretrained=null", "dataset=digits",
    "backbone.config.block_out_channels=[16,32]", "backbone.config.layers_per_block=1",
    "backbone.config.down_block_types=[DownBlock2D,DownBlock2D]", "backbone.config.up_block_types=[UpBlock2D,UpBlock2D]",
    "backbone.config.attention_head_dim=8", "metrics=cost",
]


@pytest.fixture
def no_model_building(monkeypatch):
    """Any attempt to build a network fails the test: for checks that must refuse bad input first.

    Patched in fewstep.build and in every module that bound the name at import (tasks.evaluate), so
    the order in which tests first import those modules does not matter."""
    import fewstep.build
    import fewstep.tasks.evaluate

    def boom(*a, **k):
        raise AssertionError("a model was built before validation")

    for mod in (fewstep.build, fewstep.tasks.evaluate):
        for name in ("build_denoiser", "build_backbone"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, boom)


# Progress bars that may precede an error on stderr, dropped before its lines are counted (nothing else is):
# transformers' bar while it loads a pipeline's text encoder (backbone=sd_unet, for an error found once the model
# is built, e.g. metrics.clip_model without a CLIP folder), and the sampling bar of tasks.evaluate.generate (only
# for errors that sampling finds).
LOADING_BAR = "Loading weights:"
SAMPLING_BAR = "sampling:"


def assert_one_line_error(cfg, out, capsys, words: str, sampling_started: bool = False) -> None:
    """dispatch(cfg) run in the empty folder `out` (the cwd) stops with exit 2, its stderr is exactly one line
    `fewstep: error: ...` containing `words` (no traceback, no second line of any kind) and no metrics.json is
    left; unless sampling_started (an error only sampling can find), before sampling began. Dropped before
    the lines are counted: the progress bars named above (tqdm redraws them with carriage returns, so stderr is
    split at those too) and the empty pieces that splitting leaves."""
    import re

    from fewstep.tasks import dispatch

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dispatch(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    pieces = [p for p in re.split(r"[\r\n]", err) if p.strip()]
    assert any(p.startswith(SAMPLING_BAR) for p in pieces) == sampling_started, err[-2000:]
    lines = [p for p in pieces if not p.startswith((LOADING_BAR, SAMPLING_BAR))]
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: ") and words in lines[0], err[-2000:]
    assert not list(out.rglob("metrics.json*"))


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny random Stable-Diffusion-type pipeline folder (python -m fewstep.tools.tiny_pipeline), once a session."""
    from fewstep.pipelines import write_tiny_pipeline

    out = tmp_path_factory.mktemp("tiny_sd")
    write_tiny_pipeline(out, seed=0)
    return out
