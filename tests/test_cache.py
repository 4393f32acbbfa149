"""DeepCache: schedules, partial forwards checked against a hand-run of diffusers blocks, MACs, compile."""
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet
from torch.utils.flop_counter import FlopCounterMode

from fewstep.backbones.unet import UNetAdapter
from fewstep.config import group
from fewstep.denoiser import Denoiser
from fewstep.samplers.ddim import sample_ddim
from fewstep.schedule import NoiseSchedule, select_timesteps
from fewstep.metrics.cost import attention_as_matmuls
from fewstep.strategies.cache import (DeepCache, build_cache, nonuniform_full_steps,
                                      uniform_full_steps, validate_cache_cfg)

torch.set_num_threads(1)


def _unet(seed=0):
    """(8, 16, 16) x 1 layer, attention in the middle level: 6 skips (k = 5)."""
    return make_tiny_unet(seed, block_out_channels=(8, 16, 16), norm_num_groups=4)


@pytest.fixture(scope="module")
def unet():
    return _unet()


@pytest.fixture(scope="module")
def adapter(unet):
    return UNetAdapter(unet)


def _x(seed, b=2, size=16):
    return torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _t(v, b=2):
    return torch.full((b,), float(v))


# ---------------------------------------------------------------------------- hand-run reference
def _enc_modules(unet):
    """Names of the modules producing each skip d_m, shallow first, read off diffusers' down blocks."""
    mods = [["conv_in"]]
    for b, blk in enumerate(unet.down_blocks):
        attn = getattr(blk, "attentions", None)
        for j in range(len(blk.resnets)):
            mods.append([f"down_blocks.{b}.resnets.{j}"] + ([f"down_blocks.{b}.attentions.{j}"] if attn else []))
        if blk.downsamplers is not None:
            mods.append([f"down_blocks.{b}.downsamplers.0"])
    return mods


def _dec_layers(unet):
    """(block, resnet j, is last of block) for the decoder resnets in execution order."""
    return [(b, j, j == len(blk.resnets) - 1) for b, blk in enumerate(unet.up_blocks) for j in range(len(blk.resnets))]


def _dec_modules(unet):
    out = []
    for b, j, last in _dec_layers(unet):
        blk = unet.up_blocks[b]
        names = [f"up_blocks.{b}.resnets.{j}"]
        if getattr(blk, "attentions", None) is not None:
            names.append(f"up_blocks.{b}.attentions.{j}")
        if last and blk.upsamplers is not None:
            names.append(f"up_blocks.{b}.upsamplers.0")
        out.append(names)
    return out


@torch.no_grad()
def _hand_partial(unet, x, t, u_cached, m, text=None):
    """Shallow path of a DeepCache partial step, run with diffusers' own blocks (not the adapter). text: the
    encoder_hidden_states of a UNet2DConditionModel, for its cross-attention blocks."""
    emb = unet.time_embedding(unet.time_proj(t).to(unet.dtype))
    h = unet.conv_in(x)
    res = [h]
    for blk in unet.down_blocks:          # the whole encoder: d_0..d_m do not depend on deeper layers
        cross = {"encoder_hidden_states": text} if getattr(blk, "has_cross_attention", False) else {}
        h, r = blk(hidden_states=h, temb=emb, **cross)
        res += list(r)
    res = res[: m + 1]
    layers = _dec_layers(unet)
    h = u_cached
    for b, j, last in layers[len(layers) - (m + 1):]:
        blk = unet.up_blocks[b]
        h = blk.resnets[j](torch.cat([h, res.pop()], dim=1), emb)
        if getattr(blk, "attentions", None) is not None:
            h = blk.attentions[j](h) if text is None else \
                blk.attentions[j](h, encoder_hidden_states=text, return_dict=False)[0]
        if last and blk.upsamplers is not None:
            h = blk.upsamplers[0](h)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def _capture_u(unet, x, t, m, text=None):
    """The decoder feature u entering the resnet that consumes skip m, captured by a pre-hook on
    diffusers' own forward (its input is cat([u, d_m])); text: a UNet2DConditionModel's encoder_hidden_states."""
    layers = _dec_layers(unet)
    b, j, _ = layers[len(layers) - 1 - m]
    got = {}

    def pre(mod, args):
        got["in"] = args[0]

    hdl = unet.up_blocks[b].resnets[j].register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            unet(x, t, **({} if text is None else {"encoder_hidden_states": text}))
    finally:
        hdl.remove()
    d_channels = _enc_channels(unet)[m]
    return got["in"][:, : got["in"].shape[1] - d_channels]


def _enc_channels(unet):
    ch = [unet.conv_in.out_channels]
    for blk in unet.down_blocks:
        ch += [r.out_channels for r in blk.resnets]
        if blk.downsamplers is not None:
            ch.append(ch[-1])
    return ch


# ---------------------------------------------------------------------------- partial = hand-run
@pytest.mark.parametrize("m", [0, 2, 3, 5])
def test_partial_step_equals_hand_run_of_diffusers_blocks(unet, adapter, m):
    x0, x1 = _x(1), _x(2)
    t0, t1 = _t(700), _t(650)
    cache = DeepCache(interval=2, branch=m, num_skips=adapter.num_skips)
    with torch.no_grad():
        out0, kind0 = cache(adapter, x0, t0)
        out1, kind1 = cache(adapter, x1, t1)
    assert (kind0, kind1) == ("full", f"partial@{m}")
    torch.testing.assert_close(out0, unet(x0, t0).sample, atol=1e-6, rtol=0)
    u = _capture_u(unet, x0, t0, m)
    torch.testing.assert_close(cache._cache[0], u, atol=0, rtol=0)
    ref = _hand_partial(unet, x1, t1, u, m)
    torch.testing.assert_close(out1, ref, atol=1e-6, rtol=0)
    # and the partial step really reuses the cache: it differs from a full call at (x1, t1)
    assert (out1 - unet(x1, t1).sample).abs().max() > 1e-4


def test_interval_one_is_identical_to_no_cache(adapter):
    sched = NoiseSchedule.from_config()
    ts = select_timesteps(sched, 6, "leading")
    assert build_cache(group("cache", "deepcache", interval=1, branch=0), adapter) is None
    assert build_cache(group("cache", "none"), adapter) is None
    plain = Denoiser(adapter, sched)
    cached = Denoiser(adapter, sched, cache=DeepCache(interval=1, branch=0))
    with torch.no_grad():
        a = sample_ddim(plain, _x(3), ts, sched)
        b = sample_ddim(cached, _x(3), ts, sched)
    assert torch.equal(a, b)
    assert cached.calls == Counter(full=6) == plain.calls


# ---------------------------------------------------------------------------- MACs
def _module_flops(unet, x, t):
    with torch.no_grad(), attention_as_matmuls():
        with FlopCounterMode(display=False) as fc:
            unet(x, t)
    counts = fc.get_flop_counts()
    return fc.get_total_flops(), {k[len("UNet2DModel."):]: sum(v.values()) for k, v in counts.items()
                                  if k.startswith("UNet2DModel.")}


def test_partial_macs_drop_by_the_skipped_layers(unet, adapter):
    x, t = _x(4), _t(500)
    total, per = _module_flops(unet, x, t)
    enc, dec = _enc_modules(unet), _dec_modules(unet)
    k = adapter.num_skips - 1
    assert len(enc) == len(dec) == k + 1
    partial_macs = []
    for m in range(k + 1):
        macs = DeepCache(interval=2, branch=m).measure_macs(adapter, x)
        assert macs["full"] == total / 2 / x.shape[0]
        skipped = [n for names in enc[m + 1:] for n in names] + ["mid_block"] + \
                  [n for names in dec[: k - m] for n in names]
        expected = sum(per[n] for n in skipped) / 2 / x.shape[0]
        assert expected > 0
        assert macs["full"] - macs[f"partial@{m}"] == pytest.approx(expected, rel=1e-12)
        partial_macs.append(macs[f"partial@{m}"])
    # shallower branch -> cheaper partial call
    assert all(a < b for a, b in zip(partial_macs, partial_macs[1:]))
    assert partial_macs[-1] < total / 2 / x.shape[0]


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("T,N", [(100, 2), (100, 3), (100, 5), (100, 10), (7, 3), (10, 20), (1, 4)])
def test_uniform_schedule(T, N):
    idx = uniform_full_steps(T, N)
    assert len(idx) == math.ceil(T / N)
    assert idx == [i for i in range(T) if i % N == 0]
    cache = DeepCache(interval=N, branch=0)
    assert [i for i in range(T) if cache.is_full(i)] == idx == cache.full_steps(T)


def _eq5_reference(T, k, c, p):
    """DeepCache eq. 5 in plain python with the signed-power convention (no p adjustment)."""
    lo, hi = -(c ** (1 / p)), (T - c) ** (1 / p)
    ls = [lo + j * (hi - lo) / k for j in range(k)]
    return sorted({0} | {math.floor(round(math.copysign(abs(l) ** p, l), 9) + c) for l in ls[1:]})


@pytest.mark.parametrize("N", [2, 3, 5, 10])
def test_nonuniform_schedule(N):
    T, c = 100, 15
    k = math.ceil(T / N)
    idx, p = nonuniform_full_steps(T, N, center=c, power=1.4)
    assert len(idx) == k == len(set(idx)) and idx[0] == 0 and idx == sorted(idx) and idx[-1] < T
    assert 1.0 <= p <= 1.4
    assert idx == _eq5_reference(T, k, c, p)
    gaps = np.diff(idx)
    near = [g for a, g in zip(idx, gaps) if abs(a - c) <= 10]
    far = [g for a, g in zip(idx, gaps) if a >= c + 40]
    assert np.mean(near) < np.mean(far)             # denser around the center
    # the object follows the planned schedule; default center is round(0.15 T)
    cache = DeepCache(interval=N, branch=0, schedule="nonuniform", center=c)
    cache.plan(T)
    assert [i for i in range(T) if cache.is_full(i)] == idx
    assert DeepCache(interval=N, branch=0, schedule="nonuniform").full_steps(T) == idx


def test_nonuniform_power_one_is_evenly_spaced():
    idx, p = nonuniform_full_steps(100, 3, center=40, power=1.0)
    assert p == 1.0 and idx == [math.floor(j * 100 / 34) for j in range(34)]


def test_nonuniform_needs_a_plan(adapter):
    cache = DeepCache(interval=2, branch=0, schedule="nonuniform")
    with torch.no_grad():
        cache(adapter, _x(5), _t(900))                  # call 0 is always full
        with pytest.raises(ValueError, match="plan"):
            cache(adapter, _x(5), _t(800))
    with pytest.raises(ValueError, match=r"0\.\.9"):
        DeepCache(interval=2, branch=0, schedule="nonuniform", center=12).plan(10)


# ---------------------------------------------------------------------------- invalid params
@pytest.mark.parametrize("cfg,match", [
    (dict(interval=0), r"interval must be an integer >= 1"),
    (dict(interval=2.5), r"interval must be an integer >= 1"),
    (dict(branch=-1), r"branch must be an integer skip index in 0\.\.num_skips-1"),
    (dict(power=0), r"power must be a number > 0"),
    (dict(power=-1.4), r"power must be a number > 0"),
    (dict(schedule="cosine"), r"choose from uniform, nonuniform"),
    (dict(center=-3), r"center must be null or a model-call index >= 0"),
    (dict(compile="yes"), r"compile must be true or false"),
    (dict(name="fastcache"), r"choose from none, deepcache"),
])
def test_invalid_params(cfg, match):
    full = group("cache", "deepcache", **cfg)           # every other key as conf/cache/deepcache.yaml has it
    with pytest.raises(ValueError, match=match):
        validate_cache_cfg(full)


def test_branch_out_of_range_for_the_model(adapter):
    assert adapter.num_skips == 6
    with pytest.raises(ValueError, match=r"branch must be in 0\.\.5 for this UNet"):
        build_cache(group("cache", "deepcache", interval=3, branch=6), adapter)
    assert build_cache(group("cache", "deepcache", interval=3, branch=5), adapter).branch == 5


def test_build_from_the_config_group(compose, adapter):
    cfg = compose(["cache=deepcache", "cache.interval=5", "cache.branch=2"])
    cache = build_cache(cfg.cache, adapter)
    assert isinstance(cache, DeepCache) and (cache.interval, cache.branch, cache.schedule) == (5, 2, "uniform")
    assert build_cache(compose([]).cache, adapter) is None


# ---------------------------------------------------------------------------- reset, guards, hooks
def test_reset_and_batch_shape_guard(adapter):
    cache = DeepCache(interval=3, branch=1)
    with torch.no_grad():
        assert cache(adapter, _x(6), _t(900))[1] == "full"
        assert cache(adapter, _x(6), _t(880))[1] == "partial@1"
        cache.reset()
        assert cache._cache is None
        assert cache(adapter, _x(6), _t(900))[1] == "full"
        assert cache(adapter, _x(7, b=3), _t(880, b=3))[1] == "full"   # batch changed: recompute
        assert cache._cache[0].shape[0] == 3
        assert cache(adapter, _x(7, b=3), _t(860, b=3))[1] == "partial@1"
    other = cache.with_interval(5)        # same (compiled) forwards, its own schedule and state
    assert other._fns is cache._fns and other._cache is None and other.interval == 5 and other.branch == 1


def test_skip_hooks_act_at_full_and_partial_steps(unet):
    adapter = UNetAdapter(unet)
    seen = []
    adapter.skip_hooks.append(lambda i, d, u, t: (seen.append(i), (0.5 * d, u))[1])
    cache = DeepCache(interval=2, branch=2)
    k = adapter.num_skips - 1
    with torch.no_grad():
        cache(adapter, _x(8), _t(600))
        assert seen == list(range(k + 1))
        seen.clear()
        out, kind = cache(adapter, _x(9), _t(580))
    assert kind == "partial@2" and seen == list(range(k - 2, k + 1))
    plain = UNetAdapter(unet)
    with torch.no_grad():
        _, c_plain = plain.forward_full(_x(8), _t(600), branch=2)
        assert (out - plain.forward_partial(_x(9), _t(580), c_plain, branch=2)).abs().max() > 1e-4


# ---------------------------------------------------------------------------- a sampling run
def test_sampling_run_counts_kinds_and_never_reuses_a_cache(adapter):
    sched = NoiseSchedule.from_config()
    ts = select_timesteps(sched, 10, "leading")
    cache = DeepCache(interval=3, branch=1)
    model = Denoiser(adapter, sched, cache=cache)
    with torch.no_grad():
        a = sample_ddim(model, _x(10), ts, sched)
        assert model.calls == Counter({"full": 4, "partial@1": 6})
        model.reset()
        b = sample_ddim(model, _x(10), ts, sched)
    assert model.calls == Counter({"full": 4, "partial@1": 6})
    assert torch.equal(a, b)
    nonu = DeepCache(interval=3, branch=1, schedule="nonuniform", center=2)
    nonu.plan(10)
    model = Denoiser(adapter, sched, cache=nonu)
    with torch.no_grad():
        sample_ddim(model, _x(10), ts, sched)
    assert model.calls["full"] == 4 and model.nfe == 10


# ---------------------------------------------------------------------------- torch.compile
def _tiny_unet8():
    return make_tiny_unet(0, sample_size=8, block_out_channels=(4, 8), down_block_types=("DownBlock2D",) * 2,
                          up_block_types=("UpBlock2D",) * 2, norm_num_groups=2)


def _compiled_vs_eager(backend):
    """Eager vs compiled DeepCache, with Skip-Tuning hooks on the adapter (they are traced into both graphs)."""
    from fewstep.strategies.skip import build_skip
    adapter = UNetAdapter(_tiny_unet8())
    adapter.skip_hooks.extend(build_skip(group("skip", "linear", rho_top=1.0, rho_bottom=0.7), adapter))
    assert adapter.skip_hooks
    eager, comp = DeepCache(interval=2, branch=1), DeepCache(interval=2, branch=1, compile=True, compile_backend=backend)
    with torch.no_grad():
        for i, t in enumerate([900.0, 850.0, 800.0]):
            x = _x(20 + i, size=8)
            (a, ka), (b, kb) = eager(adapter, x, _t(t)), comp(adapter, x, _t(t))
            assert ka == kb
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    assert kb == "full" and ka == "full" and comp._fns[1] is not None


def test_compile_matches_eager():
    """torch.compile of the two static forwards (aot_eager: dynamo + AOTAutograd graph capture, quick)."""
    _compiled_vs_eager("aot_eager")


@pytest.mark.skipif(os.environ.get("FEWSTEP_SLOW_TESTS") != "1",
                    reason="inductor's cold C++ compile takes ~2 min on 2 CPU cores; set FEWSTEP_SLOW_TESTS=1 "
                           "(verified by hand and by the DeepCache bench, which runs compiled)")
def test_compile_inductor_matches_eager():
    _compiled_vs_eager("inductor")


def test_count_macs_counts_attention_like_deepcache_does():
    """One MACs convention: an uncached call and DeepCache's full call of the same network count the same
    MACs, attention included (FlopCounterMode does not see the fused CPU attention kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fewstep.backbones.uvit import UViT
    from fewstep.metrics.cost import count_macs

    net = UViT().eval()
    x, t = torch.randn(1, 1, 28, 28), torch.tensor([5.0])
    with torch.no_grad(), FlopCounterMode(display=False) as fused:   # the default kernels: attention unseen
        net(x, t)
    with torch.no_grad(), attention_as_matmuls(), FlopCounterMode(display=False) as math:
        net(x, t)
    assert math.get_total_flops() > fused.get_total_flops()          # the difference is the attention
    assert count_macs(net, x, t) == math.get_total_flops() // 2
    from fewstep.backbones.uvit import UViTAdapter
    adapter = UViTAdapter(net)
    assert DeepCache(interval=2, branch=0).measure_macs(adapter, x)["full"] == count_macs(adapter, x, t)
