"""task=train: the Lightning DiffusionModule learns, exports a loadable save_pretrained folder, and resumes."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_OVERRIDES, compose_cfg
from test_uvit import TINY_UVIT_OVERRIDES

TRAIN = ["task=train", "logger=none", "task.batch_size=32", "task.warmup_steps=2", "task.sample_every=100000",
         "task.ema_decay=0.9"]
BACKBONES = {"unet": TINY_OVERRIDES, "uvit": TINY_UVIT_OVERRIDES}


def fixed_batch_loss(unet, alpha_bar, x0, seed=0):
    """The DDPM loss of `unet` on x0 at fixed (t, eps): the same draw before and after training."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, len(alpha_bar), (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        return float(((unet(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t).sample - eps) ** 2).mean())


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_training_reduces_the_loss(backbone):
    import lightning as L

    from fewstep.data import load_dataset
    from fewstep.tasks.train import DiffusionModule

    cfg = compose_cfg([*BACKBONES[backbone], *TRAIN])
    torch.manual_seed(0)
    module = DiffusionModule(OmegaConf.to_container(cfg.backbone.config, resolve=True),
                             OmegaConf.to_container(cfg.backbone.schedule, resolve=True), lr=3e-3, warmup_steps=2,
                             max_steps=60, backbone=backbone)
    x = load_dataset(cfg.dataset, "train")
    x = (x[0] if isinstance(x, tuple) else x)[:256]
    probe = x[:128]
    before = fixed_batch_loss(module.net.eval(), module.alpha_bar, probe)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=32, shuffle=True)
    L.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, loader)
    after = fixed_batch_loss(module.net.eval(), module.alpha_bar, probe)
    assert after < 0.7 * before, (before, after)
    # the EMA tracked the weights: it moved away from the initial network towards the trained one
    ema_after = fixed_batch_loss(module.ema.eval(), module.alpha_bar, probe)
    assert ema_after < before, (before, ema_after)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_train_task_exports_a_loadable_model_and_resumes(backbone, tmp_path, monkeypatch, capsys):
    from fewstep.build import build_denoiser
    from fewstep.tasks import train

    calls = []
    step = train.DiffusionModule.training_step
    monkeypatch.setattr(train.DiffusionModule, "training_step",
                        lambda self, batch, idx: calls.append(idx) or step(self, batch, idx))
    run_dir, export = tmp_path / "run", tmp_path / "export"
    args = [*BACKBONES[backbone], *TRAIN, f"task.run_dir={run_dir}", f"task.export_dir={export}", "task.ckpt_every=3"]

    result = train.run(compose_cfg([*args, "task.max_steps=3"]))
    assert result["steps"] == 3 and len(calls) == 3
    state = json.loads((export / "train_state.json").read_text())
    assert state["step"] == 3 and state["dataset"] == "digits" and state["params"] == result["params"]
    assert state["backbone"] == backbone
    assert (run_dir / "ckpts" / "last.ckpt").exists() and not list(tmp_path.glob("export.*"))

    # the exported folder is the EMA of the checkpoint, and backbone.pretrained=<folder> samples it
    ckpt = torch.load(run_dir / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)
    ema = {k[len("ema."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    model = build_denoiser(compose_cfg([*BACKBONES[backbone], f"backbone.pretrained={export}"]), torch.device("cpu"))
    net = getattr(model.backbone, backbone)  # UNetAdapter.unet, UViTAdapter.uvit
    loaded = net.state_dict()
    assert ema.keys() == loaded.keys() and all(torch.equal(ema[k], loaded[k]) for k in ema)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x, 500), net(x, torch.full((2,), 500.0)).sample)

    # a longer run in the same run_dir continues at step 3: two more training steps, not five
    calls.clear()
    capsys.readouterr()
    result = train.run(compose_cfg([*args, "task.max_steps=5"]))
    assert "resuming from" in capsys.readouterr().out
    assert result["steps"] == 5 and len(calls) == 2
    assert json.loads((export / "train_state.json").read_text())["step"] == 5


def test_min_snr_gamma_weight_is_min_snr_over_snr():
    from fewstep.tasks.train import DiffusionModule

    cfg = compose_cfg([*TINY_OVERRIDES, *TRAIN])
    args = (OmegaConf.to_container(cfg.backbone.config, resolve=True),
            OmegaConf.to_container(cfg.backbone.schedule, resolve=True))
    assert DiffusionModule(*args).loss_weight(torch.arange(1000)) is None
    m = DiffusionModule(*args, min_snr_gamma=5.0)
    t = torch.arange(1000)
    ab = m.alpha_bar.double()
    snr = ab / (1 - ab)
    w = m.loss_weight(t).double()
    torch.testing.assert_close(w, torch.minimum(snr, torch.full_like(snr, 5.0)) / snr, rtol=1e-6, atol=0)
    # low noise (high SNR) is down-weighted, high noise keeps weight 1; the crossing is where SNR = 5
    assert w[0] < 0.01 and torch.all(w[snr.float() <= 5] == 1) and torch.all(w[snr.float() > 5] < 1)


def test_constant_lr_schedule_holds_the_rate_after_warm_up():
    from fewstep.tasks.train import DiffusionModule

    cfg = compose_cfg([*TINY_OVERRIDES, *TRAIN])
    args = (OmegaConf.to_container(cfg.backbone.config, resolve=True),
            OmegaConf.to_container(cfg.backbone.schedule, resolve=True))
    for kind, expect in (("constant", [0.5, 1.0, 1.0, 1.0]), ("cosine", [0.5, 1.0, 0.5, 0.0])):
        sched = DiffusionModule(*args, lr=1.0, warmup_steps=2, max_steps=4, lr_schedule=kind) \
            .configure_optimizers()["lr_scheduler"]["scheduler"]
        got = [sched.lr_lambdas[0](s) for s in (0, 2, 3, 4)]
        assert got == pytest.approx(expect), (kind, got)


def test_long_training_counts_steps_across_sittings_and_keeps_the_best(tmp_path, capsys):
    """init_from carries total_steps on; the progress log exports the EMA only when the fast FID improves."""
    from fewstep.tasks import train

    export, run_dir = tmp_path / "export", tmp_path / "run"
    first = [*TINY_OVERRIDES, *TRAIN, f"task.run_dir={run_dir}", f"task.export_dir={export}", "task.ckpt_every=2",
             "task.max_steps=2"]
    train.run(compose_cfg(first))
    assert json.loads((export / "train_state.json").read_text())["total_steps"] == 2

    # a new sitting on a fresh run folder starts from the export: its weights, and its step count
    run2 = tmp_path / "run2"
    cfg = compose_cfg([*TINY_OVERRIDES, *TRAIN, f"task.run_dir={run2}", f"task.export_dir={tmp_path / 'export2'}",
                       f"task.init_from={export}", "task.ckpt_every=1", "task.max_steps=1", "task.lr=0"])
    out = train.run(cfg)
    assert "initialized from" in capsys.readouterr().out
    assert out["steps_before"] == 2
    assert json.loads((tmp_path / "export2" / "train_state.json").read_text())["total_steps"] == 3
    assert train.init_state(cfg.task, run2, resuming=True) == 2   # a resumed sitting keeps its offset

    # the progress log: best_dir gets the model only when the FID is the lowest so far, across instances
    net = train.new_network("unet", OmegaConf.to_container(cfg.backbone.config, resolve=True))
    log, best = tmp_path / "progress.csv", tmp_path / "best"
    p = train.ProgressLog(log, best, steps_before=100, meta={"dataset": "digits"})
    p.record(net, 10, 0.5, {"eval/fid": 50.0})
    assert json.loads((best / "train_state.json").read_text())["total_steps"] == 110
    p.record(net, 20, 0.4, {"eval/fid": 60.0})
    assert json.loads((best / "train_state.json").read_text())["total_steps"] == 110
    p2 = train.ProgressLog(log, best, steps_before=100, meta={})
    p2.record(net, 30, 0.3, {"eval/fid": 55.0})       # better than 60 but not than 50: not the best
    p2.record(net, 40, 0.3, {"eval/fid": 40.0})
    rows = p2.rows()
    assert [r["best"] for r in rows] == ["1", "0", "0", "1"] and [r["total_step"] for r in rows][-1] == "140"
    assert json.loads((best / "train_state.json").read_text())["fast_fid"] == 40.0
    walls = [float(r["wall_h"]) for r in rows]
    assert walls == sorted(walls)


@pytest.mark.parametrize("bad, msg", [("task.lr_schedule=linear", "task.lr_schedule"),
                                      ("task.min_snr_gamma=0", "task.min_snr_gamma"),
                                      ("task.min_snr_gamma=inf", "task.min_snr_gamma"),
                                      ("task.init_from=/nonexistent", "task.init_from")])
def test_bad_training_options_are_refused(bad, msg):
    from fewstep.config import ConfigError
    from fewstep.tasks import train

    with pytest.raises(ConfigError, match=msg):
        train.run(compose_cfg([*TINY_OVERRIDES, *TRAIN, bad]))


def test_an_unconditional_model_grows_into_a_conditional_one_that_starts_equal(tmp_path):
    """init_from an unconditional export into backbone.config.num_class_embeds: the class embedding starts at
    zero, so before any step the conditional network is the unconditional one for every label."""
    from fewstep.tasks import train

    cfg = compose_cfg([*TINY_OVERRIDES, *TRAIN])
    uncond = train.new_network("unet", OmegaConf.to_container(cfg.backbone.config, resolve=True))
    cond_cfg = compose_cfg([*TINY_OVERRIDES, *TRAIN, "backbone.config.num_class_embeds=11"])
    module = train.DiffusionModule(OmegaConf.to_container(cond_cfg.backbone.config, resolve=True),
                                   OmegaConf.to_container(cond_cfg.backbone.schedule, resolve=True))
    assert train.init_weights(module, uncond.state_dict()) == ["class_embedding.weight"]
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900])
    with torch.no_grad():
        ref = uncond(x, t).sample
        for net in (module.net, module.ema):
            assert torch.equal(net(x, t, class_labels=torch.tensor([0, 4, 10])).sample, ref)
    other = train.new_network("unet", OmegaConf.to_container(compose_cfg(
        [*TINY_OVERRIDES, "backbone.config.block_out_channels=[16,16]"]).backbone.config, resolve=True))
    for bad in (other.state_dict(), dict(uncond.state_dict(), **{"conv_in.weight": torch.zeros(1)})):
        with pytest.raises(ValueError, match="does not fit this network"):
            train.init_weights(module, bad)


def test_progress_log_gains_a_class_accuracy_column_when_it_first_appears(tmp_path):
    from fewstep.tasks import train

    cfg = compose_cfg([*TINY_OVERRIDES, *TRAIN])
    net = train.new_network("unet", OmegaConf.to_container(cfg.backbone.config, resolve=True))
    log = tmp_path / "p.csv"
    p = train.ProgressLog(log, None, steps_before=0, meta={})
    p.record(net, 1, 0.5, {"eval/fid": 50.0})
    p.record(net, 2, 0.4, {"eval/fid": 40.0, "eval/class_accuracy": 0.75})
    rows = train.ProgressLog(log, None, 0, {}).rows()
    assert [r["class_accuracy"] for r in rows] == ["", "0.7500"] and [r["fid"] for r in rows] == ["50.000", "40.000"]
    assert log.read_text().splitlines()[0].endswith(",best,class_accuracy")
