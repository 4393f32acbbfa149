"""Skip strategies (Skip-Tuning, FreeU) as adapter hooks, and the skip-norm diagnostic."""
import csv
import math

import pytest
import torch
from conftest import make_tiny_unet
from diffusers.utils.torch_utils import apply_freeu
from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter

from fewstep.backbones.unet import UNetAdapter
from fewstep.config import group
from fewstep.strategies.skip import FreeU, ScaleSkips, build_skip, fourier_filter, skip_scales
from fewstep.tasks.skip_norms import SkipNormRecorder, measure_skip_norms, summarize, write_skip_norms

torch.set_num_threads(1)


def _unet(all_plain_up_blocks=False, seed=0):
    """(32, 64, 64) x 2 layers: 9 skips. all_plain_up_blocks: only UpBlock2D (diffusers' FreeU needs it)."""
    up = ("UpBlock2D",) * 3 if all_plain_up_blocks else ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    return make_tiny_unet(seed, block_out_channels=(32, 64, 64), layers_per_block=2, up_block_types=up)


@pytest.fixture(scope="module")
def unet():
    return _unet()


@pytest.fixture(scope="module")
def adapter(unet):
    return UNetAdapter(unet)


@pytest.fixture(scope="module")
def xt():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 16, 16, generator=g), torch.tensor([100.0, 500.0])


def _run(adapter, hooks, x, t):
    adapter.skip_hooks = list(hooks)
    try:
        with torch.no_grad():
            return adapter(x, t)
    finally:
        adapter.skip_hooks = []


class _Spy:
    """Records the d and u a decoder layer receives (after the hooks before it)."""

    def __init__(self):
        self.d, self.u = {}, {}

    def __call__(self, i, d, u, t):
        self.d[i], self.u[i] = d.clone(), u.clone()
        return d, u


# --------------------------------------------------------------------------- Skip-Tuning
def test_rho_one_is_exactly_the_plain_network(unet, adapter, xt):
    x, t = xt
    with torch.no_grad():
        ref = unet(x, t).sample
    assert build_skip(group("skip", "linear"), adapter) == []
    assert build_skip(group("skip", "none"), adapter) == []
    for hooks in ([ScaleSkips([1.0] * 9)], [ScaleSkips(torch.ones(9))], [ScaleSkips([1.0] * 9, t_range=[0, 300])]):
        assert torch.equal(_run(adapter, hooks, x, t), ref)


def test_rho_formula_and_order_deepest_first(adapter, xt):
    x, t = xt
    assert adapter.num_skips == 9  # conv_in + 3 x 2 resnets + 2 downsamplers
    rho = skip_scales(adapter, rho_top=1.0, rho_bottom=0.6)
    assert rho == pytest.approx([0.6 + i * 0.4 / 8 for i in range(9)], abs=1e-15)
    assert rho[0] == 0.6 and rho[8] == 1.0
    assert skip_scales(9, rho_top=0.8, rho_bottom=1.2)[4] == pytest.approx(1.0)

    before, after = _Spy(), _Spy()
    (hook,) = build_skip(group("skip", "linear", rho_top=1.0, rho_bottom=0.6), adapter)
    _run(adapter, [before, hook, after], x, t)
    for i in range(9):
        assert torch.allclose(after.d[i], rho[i] * before.d[i], rtol=0, atol=0)
    # depth 0 is the deepest (lowest-resolution) skip, depth 8 is conv_in's output
    assert before.d[0].shape[-1] == 4 and before.d[8].shape[-1] == 16
    assert adapter.skips[8].index == 0 and before.d[8].shape[1] == adapter.unet.conv_in.out_channels


def test_level_granularity_one_rho_per_resolution(adapter):
    rho = skip_scales(adapter, rho_top=1.0, rho_bottom=0.5, granularity="level")
    levels = [s.level for s in adapter.skips]
    assert levels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rho == pytest.approx([0.5] * 3 + [0.75] * 3 + [1.0] * 3)
    for lv in set(levels):
        assert len({r for r, l in zip(rho, levels) if l == lv}) == 1
    (hook,) = build_skip(group("skip", "linear", rho_bottom=0.5, granularity="level"), adapter)
    assert hook.scales == rho


def test_window_is_per_sample(adapter, xt):
    x, t = xt  # t = [100, 500]
    scales = skip_scales(adapter, 1.0, 0.5)
    plain = _run(adapter, [], x, t)
    always = _run(adapter, [ScaleSkips(scales)], x, t)
    window = _run(adapter, build_skip(group("skip", "linear", rho_bottom=0.5, t_range=[0, 300]), adapter), x, t)
    assert not torch.allclose(plain[0], always[0])
    assert torch.equal(window[0], always[0])  # t = 100 inside [0, 300]: scaled
    assert torch.equal(window[1], plain[1])   # t = 500 outside: untouched


def test_one_scaled_skip_equals_scaled_res_samples(unet, adapter, xt, monkeypatch):
    """Hook d <- rho d at depth i == UNet2DModel.forward with that res_samples entry scaled."""
    x, t = xt
    i, rho = 4, 0.7
    info = adapter.skips[i]
    block = unet.up_blocks[info.up_block]
    original = block.forward

    def scaled_forward(hidden_states, res_hidden_states_tuple, *args, **kwargs):
        res = list(res_hidden_states_tuple)
        res[-1 - info.up_layer] = res[-1 - info.up_layer] * rho  # up blocks pop from the end
        return original(hidden_states, tuple(res), *args, **kwargs)

    monkeypatch.setattr(block, "forward", scaled_forward)
    with torch.no_grad():
        ref = unet(x, t).sample
    monkeypatch.undo()
    scales = [1.0] * 9
    scales[i] = rho
    out = _run(adapter, [ScaleSkips(scales)], x, t)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(out, _run(adapter, [], x, t), atol=1e-4)


def test_tensor_scales_get_gradients_and_per_step_table(adapter, xt):
    x, t = xt
    w = torch.full((9,), 0.8, requires_grad=True)
    adapter.skip_hooks = [ScaleSkips(w)]
    try:
        adapter(x, t).square().mean().backward()
    finally:
        adapter.skip_hooks = []
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0

    table = torch.stack([torch.full((9,), 0.5), torch.full((9,), 0.9)])  # rows for t = 900, 100
    out = _run(adapter, [ScaleSkips(table, table_t=[900.0, 100.0])], x, torch.tensor([850.0, 120.0]))
    a = _run(adapter, [ScaleSkips([0.5] * 9)], x, torch.tensor([850.0, 120.0]))
    b = _run(adapter, [ScaleSkips([0.9] * 9)], x, torch.tensor([850.0, 120.0]))
    assert torch.equal(out[0], a[0]) and torch.equal(out[1], b[1])


def test_bad_input_raises(adapter):
    with pytest.raises(ValueError, match=">= 0"):
        build_skip(group("skip", "linear", rho_bottom=-0.1), adapter)
    with pytest.raises(ValueError, match=">= 0"):
        skip_scales(9, rho_top=-1.0)
    with pytest.raises(ValueError, match="granularity"):
        build_skip(group("skip", "linear", rho_bottom=0.5, granularity="block"), adapter)
    with pytest.raises(ValueError, match="t_range"):
        build_skip(group("skip", "linear", rho_bottom=0.5, t_range=[500, 100]), adapter)
    with pytest.raises(ValueError, match="no such builder"):
        build_skip(group("skip", "linear", _target_="fewstep.strategies.skip.nope"), adapter)


def test_backbone_without_skips():
    from fewstep.backbones.gmm import GaussianMixture, GMMExact
    from fewstep.schedule import NoiseSchedule
    backbone = GMMExact(GaussianMixture(), NoiseSchedule.from_config())
    assert build_skip(group("skip", "linear"), backbone) == []  # trivial: fine on any backbone
    with pytest.raises(ValueError, match="skip connections"):
        build_skip(group("skip", "linear", rho_bottom=0.7), backbone)
    with pytest.raises(ValueError, match="skip connections"):
        build_skip(group("skip", "freeu", b1=1.2), backbone)


# --------------------------------------------------------------------------- FreeU
@pytest.mark.parametrize("shape,dtype", [((2, 3, 8, 8), torch.float32), ((1, 4, 7, 7), torch.float32),
                                         ((2, 2, 4, 6), torch.float16)])
def test_fourier_filter_matches_diffusers(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for s in (0.2, 0.9, 1.6):
        assert torch.equal(fourier_filter(x, 1, s), diffusers_fourier_filter(x, threshold=1, scale=s))


def test_freeu_hook_matches_apply_freeu(adapter):
    kw = dict(b1=1.3, b2=1.4, s1=0.8, s2=0.3)
    (hook,) = build_skip(group("skip", "freeu", **kw), adapter)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([10.0, 20.0])
    seen = set()
    for i, info in enumerate(adapter.skips):
        d = torch.randn(2, info.channels, 8, 8, generator=g)
        u = torch.randn(2, 64, 8, 8, generator=g)
        d2, u2 = hook(i, d, u, t)
        u_ref, d_ref = apply_freeu(info.up_block, u.clone(), d.clone(), **kw)  # diffusers scales in place
        assert torch.equal(u2, u_ref) and torch.equal(d2, d_ref)
        seen.add(info.up_block)
    assert seen == {0, 1, 2}  # stages 0, 1 act; up block 2 is untouched (checked by equality too)


def test_freeu_equals_diffusers_unet_forward(xt):
    """End to end: UNet2DModel whose UpBlock2Ds have FreeU enabled as enable_freeu + resolution_idx do."""
    x, t = xt
    unet = _unet(all_plain_up_blocks=True, seed=3)
    adapter = UNetAdapter(unet)
    kw = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    plain = _run(adapter, [], x, t)
    ours = _run(adapter, build_skip(group("skip", "freeu", **kw), adapter), x, t)
    for idx, blk in enumerate(unet.up_blocks):
        blk.resolution_idx = idx
        for k, v in kw.items():
            setattr(blk, k, v)
    with torch.no_grad():
        ref = unet(x, t).sample
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, plain, atol=1e-3)
    window = _run(adapter, build_skip(group("skip", "freeu", **kw, t_range=[0, 300]), adapter), x, t)
    assert torch.equal(window[0], ours[0]) and torch.equal(window[1], plain[1])


# --------------------------------------------------------------------------- skip_norms
def test_skip_norms_core(adapter, tmp_path):
    ts = [900.0, 500.0, 100.0]
    x0 = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))

    def sample_fn(callback):  # a tiny deterministic sampler: 3 evaluations in 2 steps (a Heun-like second call)
        x = x0.clone()
        for e, t in enumerate(ts):
            eps = adapter(x, torch.full((3,), t))
            if e != 1:                          # evaluation 1 corrects step 0: no callback of its own
                callback(0 if e == 0 else 1, t, x, x - eps)
            x = x - 0.1 * eps
        return x

    variants = {"plain": [], "linear": build_skip(group("skip", "linear", rho_bottom=0.5), adapter)}
    rows = measure_skip_norms(adapter, sample_fn, variants)
    assert adapter.skip_hooks == []  # restored
    assert len(rows) == 2 * len(ts) * adapter.num_skips
    keys = {(r["variant"], r["step"], r["depth"]) for r in rows}
    assert keys == {(v, s, i) for v in variants for s in range(len(ts)) for i in range(adapter.num_skips)}
    assert all(math.isfinite(r["prop"]) and r["prop"] > 0 for r in rows)
    assert {(r["step"], r["t"]) for r in rows} == set(enumerate(ts))
    assert {(r["step"], r["sampler_step"]) for r in rows} == {(0, 0), (1, 0), (2, 1)}
    assert all(r["level"] == adapter.skips[r["depth"]].level for r in rows)
    # step 0, depth 0: same input, u comes from the mid block, d is halved -> prop exactly halves
    p = {(r["variant"], r["step"], r["depth"]): r["prop"] for r in rows}
    assert p[("linear", 0, 0)] == pytest.approx(0.5 * p[("plain", 0, 0)], rel=1e-6)

    csv_path, png_path = write_skip_norms(rows, str(tmp_path))
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["variant", "step", "sampler_step", "t", "depth", "level", "prop"] and len(table) == len(rows)
    assert (tmp_path / "skip_norms.png").stat().st_size > 0
    summary = summarize(rows)
    assert summary["nfe/plain"] == 3 and summary["prop/linear/i0"] < summary["prop/plain/i0"]
    for v in variants:
        assert summary[f"prop_max/{v}/i0"] == max(r["prop"] for r in rows if r["variant"] == v and r["depth"] == 0)
        assert summary[f"prop_max/{v}"] == max(r["prop"] for r in rows if r["variant"] == v)


def test_recorder_counts_partial_evaluations():
    rec = SkipNormRecorder()
    d, u, t = torch.ones(2, 3, 4, 4), 2 * torch.ones(2, 3, 4, 4), torch.tensor([5.0, 5.0])
    for i in [0, 1, 2, 2, 1, 2]:  # a full pass, a partial one (only i=2), another partial (i=1,2)
        assert rec(i, d, u, t)[0] is d
    assert [r[0] for r in rec.records] == [0, 0, 0, 1, 2, 2]
    assert all(float(r[3]) == pytest.approx(0.5) for r in rec.records)


def test_skip_norms_task_end_to_end(tmp_path):
    """run(cfg) on the composed config: fresh tiny UNet, ddim 2 steps, Skip-Tuning on."""
    from hydra import compose, initialize_config_dir
    from fewstep.config import repo_path
    from fewstep.tasks import skip_norms

    overrides = ["task=skip_norms", "task.batch_size=2", "sampler=ddim", "sampler.steps=2", "skip.rho_bottom=0.5",
                 "logger=none", "device=cpu", "backbone.pretrained=null",
                 "backbone.config.block_out_channels=[8,16]", "backbone.config.layers_per_block=1",
                 "backbone.config.down_block_types=[DownBlock2D,DownBlock2D]",
                 "backbone.config.up_block_types=[UpBlock2D,UpBlock2D]", "backbone.config.norm_num_groups=4",
                 "backbone.config.attention_head_dim=8"]
    with initialize_config_dir(config_dir=repo_path("conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    result = skip_norms.run(cfg, out_dir=str(tmp_path))
    with open(tmp_path / "skip_norms.csv") as f:
        table = list(csv.DictReader(f))
    n_skips = 1 + 2 * 1 + 1  # conv_in, one resnet per block, one downsampler
    assert len(table) == 2 * 2 * n_skips and {r["variant"] for r in table} == {"plain", "linear"}
    assert result["nfe/plain"] == 2 and result["prop/linear/i0"] < result["prop/plain/i0"]
    assert (tmp_path / "skip_norms.png").exists() and (tmp_path / "metrics.json").exists()
    assert [int(r["sampler_step"]) for r in table if r["variant"] == "plain" and r["depth"] == "0"] == [0, 1]
    # Heun, 3 steps = 5 evaluations: each step's correction is labelled with the step it corrects
    with initialize_config_dir(config_dir=repo_path("conf"), version_base=None):
        cfg = compose("config", overrides=[o if o != "sampler=ddim" else "sampler=heun" for o in overrides
                                           if o != "sampler.steps=2"] + ["sampler.steps=3"])
    skip_norms.run(cfg, out_dir=str(tmp_path / "heun"))
    with open(tmp_path / "heun" / "skip_norms.csv") as f:
        plain = [r for r in csv.DictReader(f) if r["variant"] == "plain" and r["depth"] == "0"]
    assert [int(r["step"]) for r in plain] == [0, 1, 2, 3, 4]
    assert [int(r["sampler_step"]) for r in plain] == [0, 0, 1, 1, 2]
