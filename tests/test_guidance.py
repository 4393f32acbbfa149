"""Conditioning and classifier-free guidance: exact special cases, composition with the strategies,
labels that depend on the sample index only, and one-line refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg, group_cfg, make_tiny_unet

C = 3                                                     # classes; embedding C is the null class
SAMPLER = OmegaConf.create({"name": "dpmpp", "steps": 4, "order": 2, "lower_order_final": True,
                            "timesteps": "linspace", "endpoint": True})


@pytest.fixture(scope="module")
def cond_unet():
    return make_tiny_unet(seed=3, num_class_embeds=C + 1)


def denoiser(unet, guidance=None, cache=None, hooks=()):
    from fewstep.backbones.unet import UNetAdapter
    from fewstep.denoiser import Denoiser
    from fewstep.schedule import NoiseSchedule

    adapter = UNetAdapter(unet)
    adapter.skip_hooks.extend(h(adapter) if callable(h) and not hasattr(h, "hook") else h for h in hooks)
    return Denoiser(adapter, NoiseSchedule.from_config("linear", 1000), cache=cache, guidance=guidance,
                    null_label=C)


def run(model, y, z, **kw):
    from fewstep.samplers import sample

    model.reset()
    with torch.no_grad():
        return sample(SAMPLER, model, z, None, model.schedule, extra_args={"class_labels": y}, **kw)


def inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % C


def test_adapter_equals_unet2dmodel_with_class_labels(cond_unet):
    """The adapter's walk, full and partial (DeepCache), is UNet2DModel.forward(x, t, class_labels)."""
    from fewstep.backbones.unet import UNetAdapter

    x, y = inputs()
    t = torch.full((4,), 421.0)
    a = UNetAdapter(cond_unet)
    with torch.no_grad():
        ref = cond_unet(x, t, class_labels=y).sample
        assert torch.equal(a(x, t, class_labels=y), ref)
        out, cache = a.forward_full(x, t, branch=2, class_labels=y)
        assert torch.equal(out, ref)
        assert torch.equal(a.forward_partial(x, t, cache, branch=2, class_labels=y), ref)
        assert not torch.equal(a(x, t, class_labels=(y + 1) % C), ref)   # the label is used


def test_scale_one_is_the_conditional_model_and_scale_zero_the_unconditional(cond_unet):
    from fewstep.strategies.guidance import Guidance

    z, y = inputs()
    plain = denoiser(cond_unet)
    cond = run(plain, y, z)
    assert torch.equal(run(denoiser(cond_unet, Guidance(1.0)), y, z), cond)
    g0 = denoiser(cond_unet, Guidance(0.0))
    assert torch.equal(run(g0, y, z), run(plain, torch.full_like(y, C), z))
    assert g0.rows == g0.calls                                   # one row per call at w = 0 and w = 1


def test_guided_eps_is_the_cfg_combination_of_one_batched_call(cond_unet):
    from fewstep.strategies.guidance import Guidance

    x, y = inputs()
    plain, g = denoiser(cond_unet), denoiser(cond_unet, Guidance(2.5))
    with torch.no_grad():
        eps_c, eps_u, eps = plain(x, 500, y), plain(x, 500, torch.full_like(y, C)), g(x, 500, y)
    torch.testing.assert_close(eps, eps_u + 2.5 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    assert g.calls["full"] == 1 and g.rows["full"] == 2


def test_interval_guides_inside_its_closed_window_only(cond_unet):
    from fewstep.strategies.guidance import Guidance

    x, y = inputs()
    plain, g = denoiser(cond_unet), denoiser(cond_unet, Guidance(3.0, interval=(300.0, 600.0)))
    with torch.no_grad():
        for t, guided in ((299.0, False), (300.0, True), (450.0, True), (600.0, True), (601.0, False)):
            g.reset()
            eps = g(x, t, y)
            assert g.rows["full"] == (2 if guided else 1), t
            if not guided:
                assert torch.equal(eps, plain(x, t, y)), t       # the conditional eps alone, one row
    # along a trajectory: rows per sample = calls + calls inside the window
    m = denoiser(cond_unet, Guidance(3.0, interval=(300.0, 600.0)))
    run(m, y, torch.randn(4, 1, 16, 16))
    ts = np.linspace(999, 0, 4)
    assert m.calls["full"] == 4 and m.rows["full"] == 4 + int(((ts >= 300) & (ts <= 600)).sum())


def test_rescale_matches_the_conditional_x0_std(cond_unet):
    from fewstep.schedule import NoiseSchedule
    from fewstep.strategies.guidance import Guidance

    x, y = inputs()
    s = NoiseSchedule.from_config("linear", 1000)
    plain = denoiser(cond_unet)
    with torch.no_grad():
        eps_c, eps_u = plain(x, 700, y), plain(x, 700, torch.full_like(y, C))
    cfg0, cfg1 = Guidance(4.0, rescale=0.0), Guidance(4.0, rescale=1.0)
    assert torch.equal(cfg0.combine(eps_c, eps_u, x, 700, s), eps_u + 4.0 * (eps_c - eps_u))
    x0_c, x0_r = s.x0_from_eps(x, 700, eps_c), s.x0_from_eps(x, 700, cfg1.combine(eps_c, eps_u, x, 700, s))
    torch.testing.assert_close(x0_r.flatten(1).std(1), x0_c.flatten(1).std(1), rtol=1e-4, atol=1e-6)
    half = Guidance(4.0, rescale=0.5).combine(eps_c, eps_u, x, 700, s)
    torch.testing.assert_close(half, 0.5 * (cfg0.combine(eps_c, eps_u, x, 700, s) + cfg1.combine(eps_c, eps_u, x, 700, s)),
                               rtol=1e-4, atol=1e-5)


def test_cfg_with_deepcache_equals_deepcache_on_each_row(cond_unet):
    from fewstep.strategies.cache import DeepCache
    from fewstep.strategies.guidance import Guidance

    z, y = inputs()
    w = 2.0
    guided = denoiser(cond_unet, Guidance(w), cache=DeepCache(interval=2, branch=1))
    x = run(guided, y, z)
    assert guided.calls == {"full": 2, "partial@1": 2} and guided.rows == {"full": 4, "partial@1": 4}

    # the same sampler by hand: each row's eps from its own DeepCache, combined
    from fewstep.samplers import sample

    mc, mu = (denoiser(cond_unet, cache=DeepCache(interval=2, branch=1)) for _ in range(2))

    def by_rows(xt, t, class_labels):
        e_c, e_u = mc(xt, t, class_labels), mu(xt, t, torch.full_like(class_labels, C))
        return e_u + w * (e_c - e_u)

    mc.reset(), mu.reset()
    with torch.no_grad():
        ref = sample(SAMPLER, by_rows, z, None, mc.schedule, extra_args={"class_labels": y})
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)


def test_skip_rows_cond_leaves_the_unconditional_row_unchanged(cond_unet):
    from fewstep.strategies.guidance import Guidance
    from fewstep.strategies.skip import CondRowsOnly, ScaleSkips

    x, y = inputs()
    scale = [0.5] * 9
    tuned_cond = denoiser(cond_unet, Guidance(2.0), hooks=[lambda a: CondRowsOnly(ScaleSkips(scale[:a.num_skips]), a)])
    tuned, plain = denoiser(cond_unet, hooks=[lambda a: ScaleSkips(scale[:a.num_skips])]), denoiser(cond_unet)
    with torch.no_grad():
        got = tuned_cond(x, 400, y)
        e_c, e_u = tuned(x, 400, y), plain(x, 400, torch.full_like(y, C))
    torch.testing.assert_close(got, e_u + 2.0 * (e_c - e_u), rtol=1e-5, atol=1e-5)
    both = denoiser(cond_unet, Guidance(2.0), hooks=[lambda a: ScaleSkips(scale[:a.num_skips])])
    with torch.no_grad():
        e_u_tuned = tuned(x, 400, torch.full_like(y, C))
        torch.testing.assert_close(both(x, 400, y), e_u_tuned + 2.0 * (e_c - e_u_tuned), rtol=1e-5, atol=1e-5)


def test_labels_depend_on_the_sample_index_only():
    from fewstep.conditions import sample_labels

    idx = np.arange(20)
    for rule in ("balanced", "grouped", "random", 2):
        whole = sample_labels(rule, 5, idx, 10, n_samples=20)
        parts = torch.cat([sample_labels(rule, 5, idx[lo:lo + 7], 10, n_samples=20) for lo in range(0, 20, 7)])
        assert torch.equal(whole, parts), rule
    assert sample_labels("balanced", 0, idx, 10).tolist() == [i % 10 for i in range(20)]
    assert sample_labels("grouped", 0, np.arange(100), 10, n_samples=100).tolist() == [i // 10 for i in range(100)]
    r = sample_labels("random", 5, np.arange(2000), 10)
    assert set(r.tolist()) == set(range(10)) and not torch.equal(r, sample_labels("random", 6, np.arange(2000), 10))


def test_evaluate_with_guidance_counts_rows_in_macs(tmp_path, cond_unet):
    """Through the evaluate task: labels balanced over the samples, NFE = steps, MACs = 2 rows per guided call;
    batch size changes nothing but round-off."""
    from fewstep.tasks.evaluate import run as evaluate

    unet_dir = tmp_path / "unet"
    cond_unet.save_pretrained(unet_dir)
    base = [f"backbone.pretrained={unet_dir}", "dataset=digits", "dataset.image_size=16", "metrics=cost",
            "sampler.steps=3", "n_samples=6", "logger=none", "save_samples=true"]
    one = evaluate(compose_cfg(base + ["guidance=cfg", "guidance.scale=2", "batch_size=6"]), out=tmp_path / "a")
    two = evaluate(compose_cfg(base + ["guidance=cfg", "guidance.scale=2", "batch_size=4"]), out=tmp_path / "b")
    cond = evaluate(compose_cfg(base + ["batch_size=6"]), out=tmp_path / "c")
    assert one["nfe"] == cond["nfe"] == 3 and one["macs_per_sample"] == 2 * cond["macs_per_sample"]
    assert two["macs_per_sample"] == one["macs_per_sample"] and two["nfe"] == 3
    assert one["guidance"] == "cfg" and one["labels"] == "balanced" and cond["guidance"] == "none"
    assert one["guidance_interval"] is None and one["guidance_rescale"] == 0.0
    window = evaluate(compose_cfg(base + ["guidance=cfg", "guidance.scale=2", "guidance.interval=[100,700]",
                                          "guidance.rescale=0.5", "batch_size=6"]), out=tmp_path / "d")
    assert window["guidance_interval"] == "[100,700]" and window["guidance_rescale"] == 0.5   # the tables' keys
    a, b = (np.load(tmp_path / d / "samples.npz")["images"].astype(int) for d in ("a", "b"))
    assert np.abs(a - b).max() <= 1


BAD = [
    (["guidance=cfg"], "needs a class-conditional network", False),
    (["guidance=cfg", "guidance.scale=-1"], "guidance.scale must be a finite number >= 0", True),
    (["guidance=cfg", "guidance.scale=inf"], "must be a finite number", True),
    (["guidance=cfg", "guidance.interval=[600,300]"], "guidance.interval must be null or [t_lo, t_hi]", True),
    (["guidance=cfg", "guidance.interval=[0,1000]"], "guidance.interval must be null or [t_lo, t_hi]", True),
    (["labels=7"], "labels=7 is not a class of this network (0..2)", True),
    (["labels=sorted"], "labels must be balanced, grouped, random or a class index", True),
    (["backbone.config.num_class_embeds=1"], "needs its classes plus a null class", True),
    (["skip.rows=uncond"], "skip.rows must be both or cond", True),
]


@pytest.mark.parametrize("overrides, words, conditional", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_guidance_input_is_one_line_before_any_model(overrides, words, conditional, no_model_building, capsys):
    from fewstep.tasks import dispatch

    net = ["backbone.pretrained=null", "backbone.config.num_class_embeds=4"] if conditional else []
    cfg = compose_cfg([*net, *overrides, "logger=none"])
    with pytest.raises(SystemExit) as e:
        dispatch(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("fewstep: error:") and words in err[0], err


def test_class_consistency_counts_hits_per_class():
    from fewstep.metrics import ClassConsistency

    m = ClassConsistency(3)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0], [0, 5.0, 0]])
    m.update(logits[:3], torch.tensor([0, 1, 1]))
    m.update(logits[3:], torch.tensor([2, 2]))
    out = m.compute()
    assert out == {"class_accuracy": 3 / 5, "class_accuracy_0": 1.0, "class_accuracy_1": 0.5, "class_accuracy_2": 0.5}
    with pytest.raises(ValueError, match="outside the feature classifier's 3 classes"):
        m.update(logits[:1], torch.tensor([3]))


def test_metrics_report_the_classifiers_agreement_with_the_requested_labels():
    """Real test images with their true labels: class_accuracy is the shipped classifier's accuracy on them."""
    from fewstep.data import load_dataset
    from fewstep.metrics import Metrics

    cfg = compose_cfg(["metrics.is_splits=2", "metrics.fid_bootstrap=0"])
    x, y = load_dataset(cfg.dataset, "test", with_labels=True)
    x, y = x[:300], y[:300]
    m = Metrics(cfg.metrics, cfg.dataset)
    m.update(x[:200], y[:200])
    m.update(x[200:], y[200:])
    out = m.compute()
    with torch.no_grad():
        pred = m.extractor.extract(x)[1].argmax(1)
    assert out["class_accuracy"] == int((pred == y).sum()) / 300
    assert out["class_accuracy"] > 0.8
    for c in range(10):
        assert out[f"class_accuracy_{c}"] == int((pred[y == c] == c).sum()) / int((y == c).sum())


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_class_conditional_training_learns_and_reloads_for_guided_sampling(tmp_path, backbone):
    """A few steps of a class-conditional UNet / U-ViT with label dropout lower the loss on a fixed batch, for
    real labels and for the null class, and the exported folder samples with guidance."""
    import json

    from conftest import TINY_OVERRIDES
    from test_uvit import TINY_UVIT_OVERRIDES

    from fewstep.tasks import dispatch, train

    tiny = TINY_OVERRIDES if backbone == "unet" else TINY_UVIT_OVERRIDES
    key = {"unet": "num_class_embeds", "uvit": "num_classes"}[backbone]
    args = [*tiny, f"backbone.config.{key}=11", "task=train", "logger=none", "task.batch_size=32", "task.warmup_steps=2",
            "task.sample_every=100000", "task.ema_decay=0.9", "task.lr=3e-3", f"task.run_dir={tmp_path / 'run'}",
            f"task.export_dir={tmp_path / 'export'}", "task.ckpt_every=40", "task.max_steps=40"]
    cfg = compose_cfg(args)
    torch.manual_seed(0)
    module = train.DiffusionModule(OmegaConf.to_container(cfg.backbone.config, resolve=True),
                                   OmegaConf.to_container(cfg.backbone.schedule, resolve=True), label_dropout=0.5,
                                   backbone=backbone)
    assert module.null_label == 10
    y = torch.arange(1000) % 10
    dropped = module.dropped_labels(y)
    assert set(dropped.tolist()) == set(range(11)) and 0.4 < float((dropped == 10).float().mean()) < 0.6
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])

    from fewstep.data import load_dataset

    x, labels = load_dataset(cfg.dataset, "train", with_labels=True)
    x, labels = x[:64], labels[:64]
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (64,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    ab = module.alpha_bar[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x + (1 - ab).sqrt() * eps

    def loss(net, lab):
        with torch.no_grad():
            return float(((net(xt, t, class_labels=lab).sample - eps) ** 2).mean())

    result = train.run(cfg)
    assert result["steps"] == 40
    from fewstep.build import load_pretrained

    trained = load_pretrained(str(tmp_path / "export"), name=backbone)
    torch.manual_seed(0)
    fresh = train.new_network(backbone, OmegaConf.to_container(cfg.backbone.config, resolve=True))
    for lab in (labels, torch.full_like(labels, 10)):
        assert loss(trained, lab) < 0.8 * loss(fresh, lab)
    assert json.loads((tmp_path / "export" / "config.json").read_text())[key] == 11

    out = tmp_path / "sample"
    out.mkdir()
    import os

    cwd = os.getcwd()
    os.chdir(out)
    try:
        m = dispatch(compose_cfg([*tiny, f"backbone.pretrained={tmp_path / 'export'}", "guidance=cfg",
                                  "guidance.scale=2", "sampler.steps=3", "n_samples=10", "logger=none"]))
    finally:
        os.chdir(cwd)
    assert m["guidance"] == "cfg" and m["nfe"] == 3 and (out / "metrics.json").exists()


def test_uvit_label_token_through_the_adapter_and_guidance():
    """The U-ViT's label token: its adapter (full and partial forwards) equals UViT.forward(x, t, y), and
    guidance at w = 1 is its conditional model."""
    from test_uvit import make_uvit

    from fewstep.backbones.uvit import UViTAdapter
    from fewstep.denoiser import Denoiser
    from fewstep.schedule import NoiseSchedule
    from fewstep.strategies.guidance import Guidance

    net = make_uvit(seed=2, num_classes=C + 1)
    a = UViTAdapter(net)
    x = torch.randn(4, 1, 8, 8)
    y, t = torch.arange(4) % C, torch.full((4,), 333.0)
    with torch.no_grad():
        ref = net(x, t, class_labels=y).sample
        assert torch.equal(a(x, t, class_labels=y), ref)
        out, cache = a.forward_full(x, t, branch=1, class_labels=y)
        assert torch.equal(out, ref) and torch.equal(a.forward_partial(x, t, cache, branch=1, class_labels=y), ref)
        s = NoiseSchedule.from_config("linear", 1000)
        plain, g1 = Denoiser(a, s, null_label=C), Denoiser(a, s, guidance=Guidance(1.0), null_label=C)
        assert torch.equal(g1(x, 333, y), plain(x, 333, y))
        assert not torch.equal(plain(x, 333, torch.full_like(y, C)), plain(x, 333, y))


def test_labels_and_guided_samples_are_those_of_one_process_on_two(tmp_path, cond_unet):
    """trainer=ddp_cpu trainer.devices=2 (gloo): every sample keeps its label and noise, so the guided
    samples equal one process's up to float round-off."""
    from fewstep.tasks.evaluate import run as evaluate

    unet_dir = tmp_path / "unet"
    cond_unet.save_pretrained(unet_dir)
    base = [f"backbone.pretrained={unet_dir}", "dataset=digits", "dataset.image_size=16", "metrics=cost",
            "sampler.steps=3", "n_samples=6", "batch_size=2", "logger=none", "save_samples=true", "guidance=cfg",
            "guidance.scale=3", "labels=random", "device=cpu"]
    one = evaluate(compose_cfg(base), out=tmp_path / "one")
    two = evaluate(compose_cfg(base + ["trainer=ddp_cpu", "trainer.devices=2"]), out=tmp_path / "two")
    assert two["world_size"] == 2 and one["macs_per_sample"] == two["macs_per_sample"]
    a, b = (np.load(tmp_path / d / "samples.npz")["images"].astype(int) for d in ("one", "two"))
    assert a.shape == (6, 1, 16, 16) and np.abs(a - b).max() <= 1


def test_gamma_for_a_guided_model_is_its_own_file_and_refused_for_other_settings(tmp_path, cond_unet):
    """task=gamma with guidance estimates Gamma of the guided eps (the data's labels as conditions), in a file
    tagged with the guidance settings; variance=analytic takes only the file of its own settings. At w = 1 the
    guided eps is the conditional model's, so its Gamma equals the unguided estimate exactly."""
    from fewstep.config import ConfigError
    from fewstep.strategies.variance import GammaMissing, load_gamma
    from fewstep.tasks import gamma as gamma_task
    from fewstep.tasks.evaluate import run as evaluate

    unet_dir = tmp_path / "unet"
    make_tiny_unet(seed=4, num_class_embeds=11).save_pretrained(unet_dir)    # digits' 10 classes + null
    base = [f"backbone.pretrained={unet_dir}", "dataset=digits", "dataset.image_size=16", "logger=none",
            "device=cpu"]
    task = ["task=gamma", "task.M=12", "task.batch_size=6", "task.timesteps=[10,500,990]", f"task.out_dir={tmp_path / 'g'}"]
    plain = gamma_task.run(compose_cfg(base + task))
    w1 = gamma_task.run(compose_cfg(base + task + ["guidance=cfg", "guidance.scale=1"]))
    w3 = gamma_task.run(compose_cfg(base + task + ["guidance=cfg", "guidance.scale=3", "guidance.interval=[0,600]"]))
    assert len({plain["gamma_path"], w1["gamma_path"], w3["gamma_path"]}) == 3 and "_g" in w3["gamma_path"]
    g_plain, g1, g3 = (load_gamma(r["gamma_path"]) for r in (plain, w1, w3))
    assert torch.equal(g1["gamma"], g_plain["gamma"]) and not torch.equal(g3["gamma"], g_plain["gamma"])
    assert g3["guidance"] == {"scale": 3.0, "interval": [0.0, 600.0], "rescale": 0.0} and g_plain["guidance"] is None
    # at t = 990 (outside the interval) the w = 3 model is the conditional one: the same Gamma there
    assert g3["gamma"][2] == g_plain["gamma"][2] and g3["gamma"][0] != g_plain["gamma"][0]

    sample = base + ["sampler=ddpm", "sampler.steps=3", "n_samples=4", "metrics=cost", "variance=analytic",
                     f"variance.search_dirs=[{tmp_path / 'g'}]"]
    m = evaluate(compose_cfg(sample + ["guidance=cfg", "guidance.scale=3", "guidance.interval=[0,600]"]),
                 out=tmp_path / "a")
    assert m["gamma"] == w3["gamma_path"]
    assert evaluate(compose_cfg(sample), out=tmp_path / "b")["gamma"] == plain["gamma_path"]
    with pytest.raises(GammaMissing, match="with guidance {'scale': 2.0"):
        evaluate(compose_cfg(sample + ["guidance=cfg", "guidance.scale=2"]), out=tmp_path / "c")
    cond_unet.save_pretrained(tmp_path / "three")                               # 3 classes: digits has 10
    with pytest.raises(ConfigError, match="has classes 0..9, the network's class embedding only 0..2"):
        gamma_task.run(compose_cfg([f"backbone.pretrained={tmp_path / 'three'}", *base[1:], *task]))


def test_deepcache_across_a_guidance_interval_makes_the_calls_whose_rows_change_full(cond_unet):
    """Entering or leaving the guidance window changes a call's rows (B <-> 2B): the cached feature does not fit
    and that call is a full one; inside a stretch of equal rows the cache schedule runs as usual."""
    from fewstep.samplers import sample
    from fewstep.strategies.cache import DeepCache
    from fewstep.strategies.guidance import Guidance

    z, y = inputs()
    cfg = group_cfg("sampler", {"name": "ddim", "steps": 6, "eta": 0.0, "timesteps": "linspace", "endpoint": True})
    ts = np.linspace(999, 0, 6)                                  # 999, 799.2, 599.4, 399.6, 199.8, 0
    inside = (ts >= 300) & (ts <= 850)                           # calls 1, 2, 3 guided
    m = denoiser(cond_unet, Guidance(2.0, interval=(300.0, 850.0)), cache=DeepCache(interval=3, branch=1))
    seen = []
    orig = m.backbone_out

    def spy(x, t, class_labels=None, rows=1):
        seen.append(rows)
        return orig(x, t, class_labels, rows)

    m.backbone_out = spy
    m.reset()
    with torch.no_grad():
        sample(cfg, m, z, None, m.schedule, extra_args={"class_labels": y})
    assert seen == [2 if g else 1 for g in inside]
    # uniform N = 3 would make calls 0 and 3 full; the row changes at calls 1 and 4 make them full too
    assert m.calls == {"full": 4, "partial@1": 2}
    assert m.rows == {"full": 1 + 2 + 2 + 1, "partial@1": 2 + 1}
