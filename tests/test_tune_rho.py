"""task=tune_rho (learned Skip-Tuning factors) and skip=learned on a tiny random UNet."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_OVERRIDES, compose_cfg

TUNE = TINY_OVERRIDES + ["task=tune_rho", "sampler=dpmpp", "sampler.steps=3", "task.teacher_steps=10",
                         "task.n_train=8", "task.n_val=4", "task.batch_size=8", "task.max_steps=8", "task.lr=0.1",
                         "task.progress=false", "logger=none"]


def tune(tmp_path, *extra, name="run"):
    from fewstep.tasks.tune_rho import fit

    cfg = compose_cfg(TUNE + ["skip.rho_bottom=0.8", f"task.cache_dir={tmp_path / 'teacher'}", *extra])
    torch.manual_seed(0)  # the tiny UNet's random weights: the same network as learned_model's
    return fit(cfg, tmp_path / name)


def learned_model(path, *extra):
    from fewstep.build import build_denoiser

    cfg = compose_cfg(TINY_OVERRIDES + ["skip=learned", f"skip.path={path or 'null'}", "sampler=dpmpp", "sampler.steps=3",
                                        "logger=none", *extra])
    torch.manual_seed(0)
    return cfg, build_denoiser(cfg, torch.device("cpu"))


def test_tune_lowers_objective_and_skip_learned_reproduces_it(tmp_path):
    from fewstep.tasks.evaluate import generate
    from fewstep.tasks.tune_rho import initial_noise

    result, tuner = tune(tmp_path)
    assert result["steps"] == 8
    assert result["train_loss_final"] < 0.9 * result["train_loss_init"]
    assert result["val_loss_final"] < result["val_loss_init"]
    rho = tuner.rho().detach()
    assert rho.shape == (4,) and not torch.allclose(rho, torch.tensor([0.8, 0.8 + 0.2 / 3, 0.8 + 0.4 / 3, 1.0]))
    # written with the loss curve and the metrics
    out = tmp_path / "run"
    assert len((out / "loss.csv").read_text().splitlines()) == 9 and (out / "rho.png").exists()
    assert json.loads((out / "metrics.json").read_text())["rho"] == [float(v) for v in rho.tolist()]

    cfg, model = learned_model(result["rho_path"])
    (hook,) = model.backbone.skip_hooks
    assert hook.scales == [float(v) for v in rho.tolist()]          # exactly the same scales
    idx = np.arange(3)
    z = initial_noise(int(cfg.seed), idx, (1, 8, 8), "cpu")
    with torch.no_grad():
        x_tuned = tuner.student(idx.tolist(), z)
    x_learned, _ = generate(cfg, model, None, (1, 8, 8), torch.device("cpu"), idx)
    assert torch.equal(x_tuned, x_learned)                          # and exactly the same samples


def test_a_tuning_that_ends_worse_than_it_started_says_so(tmp_path, capsys, monkeypatch):
    """Steps that climb the objective (Adam with maximize=True stands in for noisy minibatch steps that
    overshoot): it ends above its start, metrics.json says improved = false and one warning line says
    what to change; the same tuning descending says improved = true and warns nothing."""
    adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: adam(params, lr=lr, maximize=True))
    result, _ = tune(tmp_path)
    assert result["train_loss_final"] > result["train_loss_init"] and result["improved"] is False
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fewstep: warning: task=tune_rho")]
    assert len(warnings) == 1 and "scores worse on its own training noise than the start (650" in warnings[0]
    monkeypatch.setattr(torch.optim, "Adam", adam)
    good, _ = tune(tmp_path, name="good")
    assert good["improved"] is True and "warning: task=tune_rho" not in capsys.readouterr().err


def test_per_step_rho_table_and_teacher_cache(tmp_path, monkeypatch):
    import fewstep.tasks.tune_rho as tr

    result, tuner = tune(tmp_path, "task.per_step=true", "task.grad_checkpointing=true", "task.max_steps=4")
    rho = tuner.rho().detach()
    assert rho.shape == (len(tuner.table_t), 4) and len(tuner.table_t) == 3   # dpmpp: one call per step
    assert result["train_loss_final"] < result["train_loss_init"]
    cfg, model = learned_model(result["rho_path"])
    (hook,) = model.backbone.skip_hooks
    assert torch.equal(hook.scales, rho) and hook.table_t.tolist() == tuner.table_t

    # the teacher targets of the same (model, sampler, seed, n) come from the cache file
    cache = list((tmp_path / "teacher").glob("teacher_*.safetensors"))
    assert len(cache) == 1
    calls, real = [], tr.sample
    monkeypatch.setattr(tr, "sample", lambda cfg_s, *a, **k: (calls.append(int(cfg_s.steps)), real(cfg_s, *a, **k))[1])
    result2, _ = tune(tmp_path, "task.max_steps=1", name="again")
    assert calls and 10 not in calls and np.isfinite(result2["train_loss_final"])


def test_feature_objective_on_fashion_mnist_classifier(tmp_path):
    from fewstep.config import repo_path
    from pathlib import Path

    if not (Path(repo_path("checkpoints/fashion_mnist/classifier")) / "model.safetensors").exists():
        pytest.skip("the shipped Fashion-MNIST classifier is not in checkpoints/")
    result, tuner = tune(tmp_path, "dataset=fashion_mnist", "task.objective=features", "task.max_steps=4",
                         "task.n_train=4", "task.n_val=0", "task.batch_size=4")
    assert tuner.feature_net is not None and result["objective"] == "features"
    assert result["train_loss_final"] < result["train_loss_init"]


@pytest.mark.parametrize("extra,message", [
    (["task.objective=pixels"], "unknown task.objective 'pixels'"),
    (["sampler=ddpm"], "task=tune_rho needs a deterministic sampler"),
    (["sampler=ddim", "sampler.eta=1.0"], "task=tune_rho needs a deterministic sampler"),
    (["task.teacher_steps=2"], "task.teacher_steps must be > sampler.steps=3"),
    (["task.n_train=0"], "task.n_train must be an integer >= 1"),
    (["skip=freeu"], "starts from skip=linear"),
    (["trainer=ddp_cpu"], "one device"),
    (["task.objective=features"], "task=train_classifier dataset=digits"),   # no classifier for digits
    (["skip.rho_bottom=2.5"], "initial rho must lie in (0, task.rho_max=2.0)"),
])
def test_bad_options_fail_with_one_line(tmp_path, extra, message):
    from fewstep.config import ConfigError
    from fewstep.tasks.tune_rho import fit

    cfg = compose_cfg(TUNE + [f"task.cache_dir={tmp_path}", f"task.classifier_dir={tmp_path / 'none'}", *extra])
    with pytest.raises(ConfigError) as e:
        fit(cfg, tmp_path / "run")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_skip_learned_refuses_bad_files(tmp_path):
    from fewstep.strategies.skip import save_learned_rho

    with pytest.raises(ValueError, match="skip=learned needs skip.path"):
        learned_model(None)
    with pytest.raises(ValueError, match="no such file"):
        learned_model(tmp_path / "missing.yaml")
    bad = save_learned_rho(tmp_path / "three.json", torch.tensor([1.0, 0.9, 0.8]), None, {"model_id": None})
    with pytest.raises(ValueError, match="holds 3 scales per step, the backbone has 4 skips"):
        learned_model(bad)
    other = save_learned_rho(tmp_path / "other.yaml", torch.ones(4) * 0.9, None, {"model_id": "0123456789abcdef"})
    with pytest.raises(ValueError, match="was learned for model 0123456789abcdef"):
        learned_model(other)
    cfg, model = learned_model(other, "skip.check_model=false")
    assert model.backbone.skip_hooks[0].scales == [0.8999999761581421] * 4   # float32 0.9, exactly


@pytest.mark.parametrize("folder", ["fashion_mnist", "fashion_mnist_early"])
def test_shipped_rho_file_loads_on_the_shipped_model(folder):
    """checkpoints/<folder>/rho_dpmpp10.yaml: one scale per skip of that folder's UNet, keyed to its model id
    (skip.check_model is on: a file of the other model would stop the build)."""
    from fewstep.build import build_denoiser
    from fewstep.strategies.skip import load_learned

    path = str(REPO / f"checkpoints/{folder}/rho_dpmpp10.yaml")
    data = load_learned(path)
    cfg = compose_cfg(["skip=learned", f"skip.path={path}", "logger=none",
                       f"backbone.pretrained={REPO / 'checkpoints' / folder / 'unet'}"])
    model = build_denoiser(cfg, torch.device("cpu"))
    (hook,) = model.backbone.skip_hooks
    assert len(hook.scales) == data["num_skips"] == 9
    assert hook.scales == data["rho"] and all(0 < r < data["rho_max"] for r in hook.scales)
    assert data["sampler"] == {"name": "dpmpp", "steps": 10, "order": 2, "lower_order_final": True,
                               "timesteps": "linspace", "endpoint": True}


@pytest.mark.parametrize("sampler", [{"name": "dpmpp", "steps": 5}, {"name": "heun", "steps": 4},
                                     {"name": "ddim", "steps": 6, "timesteps": "logsnr"}])
def test_probe_timesteps_are_the_ones_the_network_is_called_at(sampler, model, schedule):
    """The per-step rho table is keyed by the sampler's timesteps: the probe (a stand-in model, no network
    call) finds exactly the distinct timesteps a real run calls the network at."""
    from conftest import group_cfg

    from fewstep.samplers import sample
    from fewstep.tasks.tune_rho import probe_timesteps

    cfg = group_cfg("sampler", sampler)
    called = []

    def spy(x, t, **extra):
        called.append(float(t))
        return model(x, t)

    sample(cfg, spy, torch.randn(3, 2, dtype=torch.float64), None, schedule)
    model.reset()
    probed = probe_timesteps(cfg, model, (2,), "cpu")
    assert probed == sorted(set(called), reverse=True) and model.nfe == 0
