"""backbone=sd_unet: the UNet2DConditionModel adapter equals its forward, exposes the res_samples as skips,
reproduces diffusers' FreeU and has exact DeepCache partial forwards (checked against a hand-run of
diffusers' own blocks)."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from test_cache import _capture_u, _hand_partial

from fewstep.backbones.sd_unet import SDUNetAdapter
from fewstep.strategies.cache import DeepCache
from fewstep.strategies.skip import FreeU, ScaleSkips, skip_scales

torch.set_num_threads(1)

TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
# SD-1.5's block layout at a tiny width: attention at the three upper levels, none at the lowest
SD_LAYOUT = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8)


def _unet(config, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    with torch.no_grad():   # diffusers zero-initialises some output layers; make every path matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


def _inputs(config, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = config["sample_size"]
    x = torch.randn(b, config["in_channels"], s, s, generator=g)
    text = torch.randn(b, 7, config["cross_attention_dim"], generator=g)
    return x, text


@pytest.mark.parametrize("config", [TINY, SD_LAYOUT], ids=["tiny", "sd-layout"])
@torch.no_grad()
def test_adapter_equals_unet2dcondition_forward(config):
    unet = _unet(config)
    a = SDUNetAdapter(unet)
    x, text = _inputs(config)
    for t in (torch.tensor([1.0, 250.0, 999.0]), torch.tensor(17)):
        ref = unet(x, t, encoder_hidden_states=text).sample
        out = a(x, t, encoder_hidden_states=text)
        assert ref.abs().max() > 0.1
        assert (out - ref).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        a(x, torch.tensor([1.0] * 3))


@torch.no_grad()
def test_skips_are_the_res_samples_deepest_first():
    unet = _unet(TINY)
    a = SDUNetAdapter(unet)
    # conv_in + 2 resnets + downsampler + 2 resnets = 6 skips, two resolution levels
    assert a.num_skips == 6 and [s.level for s in a.skips] == [0, 0, 0, 1, 1, 1]
    assert [(s.up_block, s.up_layer) for s in a.skips] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    seen = []
    for blk in unet.up_blocks:
        f = blk.forward

        def wrapped(*args, _f=f, **kw):
            seen.extend(reversed(kw["res_hidden_states_tuple"]))   # consumed last-first
            return _f(*args, **kw)
        blk.forward = wrapped
    x, text = _inputs(TINY, b=1)
    unet(x, 10, encoder_hidden_states=text)
    got = []
    a.skip_hooks.append(lambda i, d, u, t: (got.append(d) or (d, u)))
    a(x, torch.tensor([10.0]), encoder_hidden_states=text)
    assert len(got) == len(seen) == 6 and all(torch.equal(r, d) for r, d in zip(seen, got))
    assert [s.channels for s in a.skips] == [d.shape[1] for d in got]


@torch.no_grad()
def test_skip_tuning_scales_each_res_sample():
    """Skip-Tuning on the adapter equals diffusers' forward with each res_sample scaled by its rho_i."""
    unet = _unet(TINY)
    a = SDUNetAdapter(unet)
    rho = skip_scales(a, rho_top=1.0, rho_bottom=0.6)
    a.skip_hooks.append(ScaleSkips(rho))
    x, text = _inputs(TINY)
    t = torch.tensor([500.0] * 3)
    i0 = 0
    for blk in unet.up_blocks:   # its res tuple is consumed from the end: entry n feeds decoder layer i0 + L-1-n
        def wrapped(*args, _f=blk.forward, _i0=i0, **kw):
            res = kw["res_hidden_states_tuple"]
            kw["res_hidden_states_tuple"] = tuple(r * rho[_i0 + len(res) - 1 - n] for n, r in enumerate(res))
            return _f(*args, **kw)
        blk.forward = wrapped
        i0 += len(blk.resnets)
    ref = unet(x, t, encoder_hidden_states=text).sample
    out = a(x, t, encoder_hidden_states=text)
    plain = SDUNetAdapter(_unet(TINY))(x, t, encoder_hidden_states=text)
    assert (out - plain).abs().max() > 1e-3
    assert (out - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("config", [TINY, SD_LAYOUT], ids=["tiny", "sd-layout"])
@torch.no_grad()
def test_freeu_equals_diffusers_enable_freeu(config):
    b1, b2, s1, s2 = 1.3, 1.4, 0.9, 0.2
    unet = _unet(config)
    a = SDUNetAdapter(unet)
    a.skip_hooks.append(FreeU(a.skips, b1, b2, s1, s2))
    x, text = _inputs(config)
    t = torch.tensor([20.0, 500.0, 980.0])
    plain = unet(x, t, encoder_hidden_states=text).sample
    unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    try:
        ref = unet(x, t, encoder_hidden_states=text).sample
    finally:
        unet.disable_freeu()
    out = a(x, t, encoder_hidden_states=text)
    assert (ref - plain).abs().max() > 1e-3
    assert (out - ref).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------- DeepCache

@pytest.mark.parametrize("config", [TINY, SD_LAYOUT], ids=["tiny", "sd-layout"])
@torch.no_grad()
def test_deepcache_partial_equals_hand_run_of_the_shallow_blocks(config):
    unet = _unet(config)
    a = SDUNetAdapter(unet)
    x0, text = _inputs(config, b=2)
    x1 = x0 + 0.3 * torch.randn_like(x0)
    t0, t1 = torch.tensor([600.0, 600.0]), torch.tensor([560.0, 560.0])
    k = a.num_skips - 1   # every branch of the tiny UNet; on the SD layout (12 skips) the shallow ones, a middle, the deepest
    for m in (range(a.num_skips) if config is TINY else (0, 1, 2, 6, k)):
        out, cache = a.forward_full(x0, t0, m, encoder_hidden_states=text)
        assert (out - unet(x0, t0, encoder_hidden_states=text).sample).abs().max() <= 1e-6
        assert torch.allclose(cache[0], _capture_u(unet, x0, t0, m, text=text), atol=1e-6, rtol=0)
        part = a.forward_partial(x1, t1, cache, m, encoder_hidden_states=text)
        ref = _hand_partial(unet, x1, t1, cache[0], m, text=text)
        assert (part - ref).abs().max().item() <= 1e-6
        # a partial call at the state of the full call is the full call
        assert (a.forward_partial(x0, t0, cache, m, encoder_hidden_states=text) - out).abs().max() <= 1e-5


@torch.no_grad()
def test_deepcache_strategy_on_sd_unet_counts_partial_calls_and_macs():
    unet = _unet(SD_LAYOUT)
    a = SDUNetAdapter(unet)
    x, text = _inputs(SD_LAYOUT, b=2)
    cache = DeepCache(interval=3, branch=1, num_skips=a.num_skips)
    kinds = [cache(a, x, torch.full((2,), float(t)), encoder_hidden_states=text)[1] for t in (900, 800, 700, 600)]
    assert kinds == ["full", "partial@1", "partial@1", "full"]
    macs = cache.measure_macs(a, x[:1], encoder_hidden_states=text[:1])
    assert 0 < macs["partial@1"] < 0.5 * macs["full"]


def test_sd_deepcache_bench_writes_rows_for_every_interval_and_branch(tmp_path):
    """make bench's sd_deepcache on a narrow stand-in of SD-1.5's layout: N = 1 baseline, N = 2 / 3 branches 0
    and 1, MACs counted from the calls, the markdown table written."""
    from fewstep.bench.sd_deepcache import main

    res = main(str(tmp_path), size=(1, 3), latent=8, intervals=(2, 3), repeats=1, rounds=1,
               arch=dict(block_out_channels=(16, 16, 32, 32), cross_attention_dim=24, norm_num_groups=8))
    rows = {(r["interval"], r["branch"]): r for r in res["rows"]}
    assert set(rows) == {(1, None), (2, 0), (3, 0), (2, 1), (3, 1)}
    assert rows[(2, 1)]["full"] == 2 and rows[(2, 1)]["partial"] == 1 and rows[(3, 0)]["full"] == 1
    m = res["macs"]
    assert rows[(3, 0)]["macs_per_image"] == m["full"] + 2 * m["partial@0"] and m["partial@0"] < m["partial@1"] < m["full"]
    assert rows[(1, None)]["ratio"] == 1 and all(r["macs_speedup"] > 1 for k, r in rows.items() if k[0] > 1)
    assert "| 3 | 1 |" in (tmp_path / "sd_deepcache.md").read_text()
