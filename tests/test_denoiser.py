"""Denoiser parameterizations and backbone loading."""
import pytest
import torch

from conftest import make_tiny_unet
from fewstep.backbones.gmm import GaussianMixture, GMMExact
from fewstep.config import ConfigError
from fewstep.denoiser import Denoiser
from fewstep.schedule import NoiseSchedule


class Const(torch.nn.Module):
    """A backbone that returns a fixed tensor, to check the parameterization algebra."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out


@pytest.mark.parametrize("t", [0.0, 137.0, 640.5, 999.0])
def test_parameterizations_agree_on_exact_eps(t):
    s = NoiseSchedule.from_config()
    ab = torch.tensor(float(s.alpha_bar_at(t)), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    for param, out in (("eps", eps), ("x0", x0), ("v", v)):
        d = Denoiser(Const(out), s, param)
        torch.testing.assert_close(d(xt, t), eps, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(d.x0(xt, t), x0, rtol=1e-7, atol=1e-7)
    assert d.nfe == 2 and d.calls["full"] == 2
    d.reset()
    assert d.nfe == 0
    with pytest.raises(ValueError, match="unknown parameterization"):
        Denoiser(Const(eps), s, "score")


def test_gmm_exact_eps_is_the_posterior_mean_of_the_noise():
    """E[eps | x_t] by Monte Carlo over the joint equals the closed form (binning on a 1-D mixture)."""
    mix = GaussianMixture(dim=1, n_components=3, radius=0.8, std=0.15, seed=1)
    s = NoiseSchedule.from_config()
    t = 400.0
    ab = float(s.alpha_bar_at(t))
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(400_000, g).double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps
    centers = torch.linspace(-0.6, 0.6, 7, dtype=torch.float64)
    model = GMMExact(mix, s)
    for c in centers:
        sel = (xt[:, 0] - c).abs() < 0.01
        mc = eps[sel, 0].mean()
        exact = model(c.view(1, 1), torch.tensor([t]))[0, 0]
        assert abs(mc - exact) < 4 * eps[sel, 0].std() / sel.sum().sqrt() + 0.01


def test_pretrained_round_trip_and_errors(tmp_path):
    from fewstep.build import load_pretrained as load_unet

    unet = make_tiny_unet()
    unet.save_pretrained(str(tmp_path / "m"))
    loaded = load_unet(str(tmp_path / "m"))
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 5).sample, unet(x, 5).sample)
    with pytest.raises(ConfigError, match="folder not found"):
        load_unet(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_unet(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="could not be reached.*backbone.pretrained=/local/folder"):
        load_unet("nobody-has/this-model-1234")


def test_autocast_runs_only_the_network_in_low_precision():
    from fewstep.backbones.unet import UNetAdapter
    from fewstep.denoiser import Denoiser
    from fewstep.schedule import NoiseSchedule

    sched = NoiseSchedule.from_config()
    unet = make_tiny_unet()
    plain = Denoiser(UNetAdapter(unet), sched)
    bf16 = Denoiser(UNetAdapter(unet), sched, autocast="bf16")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, low = plain(x, 300), bf16(x, 300)
        seen = []
        hook = unet.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        bf16(x, 300)
        hook.remove()
    assert seen == [torch.bfloat16] and low.dtype == torch.float32
    err = ((low - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.05   # bf16 keeps ~3 significant digits: close to float32, not equal
    with pytest.raises(ConfigError, match="autocast must be null, bf16 or fp16 \\(got fp8\\)"):
        Denoiser(UNetAdapter(unet), sched, autocast="fp8")
