"""The UNet2DModel adapter: same function as UNet2DModel.forward, right skip bookkeeping, exact partial forwards."""
import pytest
import torch
from diffusers import UNet2DModel

from fewstep.backbones.unet import UNetAdapter

CONFIGS = {
    "ddpm-cifar10-like": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32),
                              layers_per_block=2, norm_num_groups=8,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "skip-blocks": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64),
                        layers_per_block=1, norm_num_groups=8,
                        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
                        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D")),
    "resnet-sampling": dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 16, 32),
                            layers_per_block=1, norm_num_groups=8,
                            down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")),
    "fourier-time": dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                         layers_per_block=2, norm_num_groups=8, time_embedding_type="fourier",
                         down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapter_equals_unet_forward(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    unet = UNet2DModel(**cfg).eval()
    a = UNetAdapter(unet)
    x = torch.randn(3, cfg["in_channels"], 16, 16)
    for t in (torch.tensor([1.0, 250.5, 999.0]), torch.tensor(17)):
        with torch.no_grad():
            ref = unet(x, t).sample
            out = a(x, t)
        assert (out - ref).abs().max().item() <= 1e-6
    # full / partial forwards at every branch reproduce the plain forward when the cache is fresh
    t = torch.tensor([400.0] * 3)
    with torch.no_grad():
        ref = unet(x, t).sample
        for m in range(a.num_skips):
            full, cache = a.forward_full(x, t, m)
            part = a.forward_partial(x, t, cache, m)
            assert (full - ref).abs().max().item() <= 1e-6
            assert (part - ref).abs().max().item() <= 1e-5


def test_skip_bookkeeping_matches_res_samples():
    """Skips are ordered deepest first and are exactly the res_samples UNet2DModel passes to its up blocks."""
    torch.manual_seed(0)
    unet = UNet2DModel(**CONFIGS["ddpm-cifar10-like"]).eval()
    a = UNetAdapter(unet)
    # 4 blocks x 2 resnets + 3 downsamplers + conv_in = 12 skips
    assert a.num_skips == 12 and [s.depth for s in a.skips] == list(range(12))
    seen = []
    orig = [blk.forward for blk in unet.up_blocks]
    for blk, f in zip(unet.up_blocks, orig):
        def wrapped(h, res, *args, _f=f, **kw):
            seen.extend(reversed(res))  # consumed last-first
            return _f(h, res, *args, **kw)
        blk.forward = wrapped
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        unet(x, 10)
    got = []
    a.skip_hooks.append(lambda i, d, u, t: (got.append(d) or (d, u)))
    with torch.no_grad():
        a(x, torch.tensor([10.0]))
    assert len(got) == len(seen) == 12
    for d_ref, d in zip(seen, got):
        assert torch.equal(d_ref, d)
    sizes = [s.shape[-1] for s in got]
    assert sizes == sorted(sizes)  # deepest (smallest) first
    assert [s.level for s in a.skips] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [s.channels for s in a.skips] == [d.shape[1] for d in got]
