"""Native samplers on the 2-D Gaussian mixture, whose eps(x, t) is exact.

With the exact model the only error left is the solver's discretisation error, so the ODE samplers
are checked against a reference solution of the same probability-flow ODE from the same noise
(DPM-Solver++(3M) at 500 logSNR steps, cross-checked with EDM Heun at 500 Karras steps), and the
ancestral samplers against the true mixture moments.
"""
import math

import numpy as np
import pytest
import torch
from conftest import group_cfg
from omegaconf import OmegaConf

from fewstep.backbones.gmm import GaussianMixture, GMMExact
from fewstep.denoiser import Denoiser
from fewstep.samplers import SAMPLERS, planned_nfe, sample, sampler_timesteps, validate_sampler_cfg
from fewstep.samplers.ddim import sample_ddim
from fewstep.samplers.ddpm import sample_ddpm
from fewstep.samplers.dpmpp import dpmpp_orders, sample_dpmpp
from fewstep.samplers.edm import edm_sigmas, sample_euler, sample_heun
from fewstep.samplers.noise import SampleNoise
from fewstep.schedule import NoiseSchedule, select_timesteps

N_POINTS = 300


@pytest.fixture(scope="module")
def z():
    return torch.randn(N_POINTS, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(model, schedule, z):
    ref = sample_dpmpp(model, z, select_timesteps(schedule, 500, "logsnr"), schedule, order=3)
    ts = select_timesteps(schedule, 500, "karras")
    heun = sample_heun(model, float(edm_sigmas(ts, schedule)[0]) * z, ts, schedule)
    assert err(heun, ref) < 1e-4  # two different solvers agree on the ODE solution
    return ref


def err(x, ref):
    return (x - ref).norm(dim=1).mean().item()


def run(cfg, model, z, schedule, noise=None, variance=None):
    return sample(group_cfg("sampler", cfg), model, z, noise, schedule, variance)


ODE = {
    "ddim": dict(name="ddim", eta=0.0, timesteps="logsnr"),
    "dpmpp1": dict(name="dpmpp", order=1, timesteps="logsnr"),
    "dpmpp2": dict(name="dpmpp", order=2, timesteps="logsnr"),
    "dpmpp3": dict(name="dpmpp", order=3, timesteps="logsnr"),
    "euler": dict(name="euler", timesteps="karras"),
    "heun": dict(name="heun", timesteps="karras"),
}


@pytest.mark.parametrize("key", list(ODE))
def test_ode_sampler_error_falls_with_steps(key, model, schedule, z, reference):
    errors = [err(run({**ODE[key], "steps": s}, model, z, schedule), reference) for s in (5, 10, 20, 50)]
    # strictly decreasing from 10 steps on (DPM-Solver++(2M) is luckily good at 5 steps here)
    assert errors[1] > errors[2] > errors[3], errors
    assert errors[0] > errors[3] and errors[3] < 0.03, errors


def test_dpmpp_high_order_beats_ddim_at_10_steps(model, schedule, z, reference):
    ddim = err(run({**ODE["ddim"], "steps": 10}, model, z, schedule), reference)
    for order in (2, 3):
        dpm = err(run({**ODE[f"dpmpp{order}"], "steps": 10}, model, z, schedule), reference)
        assert dpm < 0.7 * ddim, (order, dpm, ddim)


@pytest.mark.parametrize("heun_steps", [20, 50])
def test_heun_beats_euler_at_equal_nfe(heun_steps, model, schedule, z, reference):
    # On this sharp mixture (component std 0.1, sigma_min 0.01) Heun's trapezoid correction over the
    # long last jumps only pays off from about 30 NFE on; below that Euler wins (checked by hand).
    nfe = 2 * heun_steps - 1
    model.reset()
    heun = err(run({"name": "heun", "steps": heun_steps}, model, z, schedule), reference)
    assert model.nfe == nfe
    model.reset()
    euler = err(run({"name": "euler", "steps": nfe}, model, z, schedule), reference)
    assert model.nfe == nfe
    assert heun < 0.8 * euler, (heun, euler)


def test_nfe_is_steps(model, schedule, z):
    for cfg in (ODE["ddim"], ODE["dpmpp3"], ODE["euler"], dict(name="ddpm")):
        model.reset()
        run({**cfg, "steps": 7}, model, z[:4], schedule, noise=SampleNoise(0, range(4), (2,)))
        assert model.nfe == 7, cfg


# ----------------------------------------------------------------------------- exact identities
def test_first_order_solvers_are_ddim(model, schedule, z):
    ts = select_timesteps(schedule, 10, "logsnr")
    ddim = sample_ddim(model, z, ts, schedule)
    torch.testing.assert_close(sample_dpmpp(model, z, ts, schedule, order=1), ddim, rtol=0, atol=1e-10)
    # EDM Euler is DDIM in VE coordinates: x_ve = x_vp / sqrt(ab) = sqrt(1 + sigma^2) x_vp
    s0 = float(edm_sigmas(ts, schedule)[0])
    torch.testing.assert_close(sample_euler(model, math.sqrt(1 + s0 ** 2) * z, ts, schedule), ddim,
                               rtol=0, atol=1e-8)


def test_ddim_eta1_is_ddpm_posterior(model, schedule, z):
    ts = select_timesteps(schedule, 20, "linspace")
    a = sample_ddim(model, z, ts, schedule, eta=1.0, noise=SampleNoise(3, range(len(z)), (2,)))
    b = sample_ddpm(model, z, ts, schedule, "beta_tilde", noise=SampleNoise(3, range(len(z)), (2,)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_dpmpp_order_schedule_matches_diffusers_rule():
    assert dpmpp_orders(10, 3) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert dpmpp_orders(10, 3, lower_order_final=False) == [1, 2, 3, 3, 3, 3, 3, 3, 3, 1]
    assert dpmpp_orders(20, 3) == [1, 2] + [3] * 17 + [1]       # >= 15 steps: only the final step drops
    assert dpmpp_orders(5, 2) == [1, 2, 2, 2, 1]
    assert dpmpp_orders(1, 3) == [1] and dpmpp_orders(2, 3) == [1, 1]
    # "always": the second-to-last step is lowered at any step count; below 15 steps it is the default rule
    assert dpmpp_orders(20, 3, "always") == [1, 2] + [3] * 16 + [2, 1]
    assert all(dpmpp_orders(n, 3, "always") == dpmpp_orders(n, 3) for n in range(1, 15))
    assert dpmpp_orders(20, 2, "always") == dpmpp_orders(20, 2)
    with pytest.raises(ValueError, match="lower_order_final must be true, false or always"):
        dpmpp_orders(20, 3, "sometimes")


# ----------------------------------------------------------------------------- ancestral samplers
@pytest.mark.parametrize("var_type", ["beta_tilde", "beta"])
def test_ddpm_matches_mixture_moments(var_type, model, schedule, mixture):
    n = 1000
    noise = SampleNoise(0, range(n), (2,), dtype=torch.float64)
    x = run({"name": "ddpm", "steps": 100, "var_type": var_type, "timesteps": "linspace"}, model, noise(),
            schedule, noise=noise)
    se = math.sqrt(mixture.cov().diagonal().max().item() / n)   # standard error of the mean
    assert (x.mean(0) - mixture.mean()).abs().max() < 4 * se
    assert (torch.cov(x.T) - mixture.cov()).abs().max() < 0.05


@pytest.mark.parametrize("cfg", [dict(name="ddpm", var_type="beta"), dict(name="ddim", eta=1.0),
                                 dict(name="diffusers", scheduler="DDPMScheduler", kwargs={"clip_sample": False})])
def test_ancestral_samplers_deterministic_given_noise(cfg, model, schedule):
    cfg = {**cfg, "steps": 10}

    def draw(indices, seed=7):
        noise = SampleNoise(seed, indices, (2,))
        return run(cfg, model, noise(), schedule, noise=noise)

    full = draw(range(6))
    torch.testing.assert_close(draw(range(6)), full, rtol=0, atol=0)
    # sample i depends on (seed, i) only, not on the batch it sits in
    torch.testing.assert_close(torch.cat([draw([0, 1]), draw([2, 3, 4, 5])]), full, rtol=0, atol=1e-6)
    assert not torch.allclose(draw(range(6), seed=8), full)


def test_variance_rule_changes_noise_only(model, schedule, z):
    calls = []

    def posterior(t, s, lam2):  # the DDPM posterior variance itself
        calls.append((t, s))
        return lam2

    ts = select_timesteps(schedule, 10, "linspace")
    a = sample_ddpm(model, z, ts, schedule, noise=SampleNoise(1, range(len(z)), (2,)), variance=posterior)
    b = sample_ddpm(model, z, ts, schedule, noise=SampleNoise(1, range(len(z)), (2,)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(calls) == 9 and all(s >= 0 for _, s in calls)   # never called on the final jump to data
    # sigma2 = 0 keeps the posterior mean: deterministic whatever the noise
    zero = lambda t, s, lam2: 0.0  # noqa: E731
    c = sample_ddpm(model, z, ts, schedule, noise=SampleNoise(1, range(len(z)), (2,)), variance=zero)
    d = sample_ddim(model, z, ts, schedule, eta=1.0, noise=SampleNoise(2, range(len(z)), (2,)), variance=zero)
    torch.testing.assert_close(c, d, rtol=0, atol=1e-12)


def test_analytic_dp_timesteps(model, schedule, z):
    cfg = group_cfg("sampler", {"name": "ddpm", "steps": 4, "timesteps": "analytic_dp"})
    with pytest.raises(ValueError, match="analytic_dp"):
        sample(cfg, model, z, SampleNoise(0, range(len(z)), (2,)), schedule, variance=None)

    class Rule:
        def __call__(self, t, s, lam2):
            return lam2

        def dp_timesteps(self, steps):
            return np.array([0, 300, 600, 999][:steps])

    from fewstep.build import explicit_timesteps

    ts = explicit_timesteps(cfg, Rule())
    assert sampler_timesteps(cfg, schedule, ts).tolist() == [999.0, 600.0, 300.0, 0.0]
    model.reset()
    sample(cfg, model, z[:3], SampleNoise(0, range(3), (2,)), schedule, variance=Rule(), timesteps=ts)
    assert model.nfe == 4 == planned_nfe(cfg, schedule, ts)
    with pytest.raises(ValueError, match="needs variance=analytic"):
        explicit_timesteps(cfg, None)


# ----------------------------------------------------------------------------- dispatch, autograd, errors
def test_every_sampler_runs_from_config(model, schedule, z, reference):
    # dpmpp on logsnr: the mixture's narrow modes need steps near t = 0 (linspace, the default tuned on the
    # shipped image model, leaves an error of ~0.43 here at 20 steps)
    cfgs = {"ddpm": dict(var_type="beta_tilde"), "ddim": dict(eta=0.0), "dpmpp": dict(order=3, timesteps="logsnr"),
            "euler": {}, "heun": {}, "diffusers": dict(scheduler="UniPCMultistepScheduler", kwargs={})}
    assert set(cfgs) == set(SAMPLERS)
    for name, extra in cfgs.items():
        cfg = group_cfg("sampler", {"name": name, "steps": 20, **extra})
        x = sample(cfg, model, z, SampleNoise(0, range(len(z)), (2,)), schedule)
        assert x.shape == z.shape and torch.isfinite(x).all()
        if name != "ddpm":
            assert err(x, reference) < 0.15, name


def test_samplers_do_not_block_gradients(model, schedule):
    for name in ("ddim", "dpmpp", "heun"):
        z = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
        x = run({"name": name, "steps": 5}, model, z, schedule)
        x.square().sum().backward()
        assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg, match", [
    (dict(name="plms", steps=10), "unknown sampler"),
    (dict(name="ddim", steps=0), "steps"),
    (dict(name="ddim", steps=10, eta=-0.5), "eta"),
    (dict(name="ddim", steps=10, timesteps="uniform"), "spacing"),
    (dict(name="dpmpp", steps=10, order=4), "order"),
    (dict(name="dpmpp", steps=10, endpoint="no"), "endpoint must be true or false"),
    (dict(name="ddpm", steps=10, timesteps="analytic_dp", endpoint=False), "endpoint=false does not apply"),
    (dict(name="ddpm", steps=10, var_type="learned"), "var_type"),
    (dict(name="ddim", steps=10, clip_x0="yes"), "clip_x0 must be true or false"),
    (dict(name="diffusers", steps=10, scheduler="NoSuchScheduler"), "UniPCMultistepScheduler"),
    (dict(name="diffusers", steps=10, scheduler="FlowMatchEulerDiscreteScheduler"), "DDPM-type"),
])
def test_validate_sampler_cfg_errors(cfg, match):
    with pytest.raises(ValueError, match=match) as e:
        validate_sampler_cfg(group_cfg("sampler", cfg))
    assert "\n" not in str(e.value)


def test_validate_accepts_shipped_configs():
    from pathlib import Path
    conf = Path(__file__).resolve().parents[1] / "conf" / "sampler"
    for f in sorted(conf.glob("*.yaml")):
        validate_sampler_cfg(OmegaConf.load(f))


# ----------------------------------------------------------------------------- the sampler interface
EVERY = {"ddpm": {}, "ddim": dict(eta=0.5), "dpmpp": dict(order=3, timesteps="logsnr"), "euler": {}, "heun": {},
         "diffusers": dict(scheduler="UniPCMultistepScheduler", kwargs={}),
         "diffusers_heun": dict(name="diffusers", scheduler="HeunDiscreteScheduler", kwargs={})}


@pytest.mark.parametrize("key", list(EVERY))
def test_samplers_take_any_callable_and_report_each_step(key, model, schedule, z):
    """A bare function (no .x0, no counters) samples exactly like the Denoiser; extra_args reach every call
    untouched; callback(i, t, x, x0) comes once per step with x0 = the data prediction at that state; and
    planned_nfe is the number of calls actually made (diffusers' Heun: 2 M - 1)."""
    cfg = group_cfg("sampler", {"name": key, "steps": 6, **EVERY[key]})
    seen, steps = [], []

    def bare(x, t, **extra):
        seen.append(extra)
        return model(x, t)

    def callback(i, t, x, x0):
        steps.append((i, t, x0.clone(), schedule.x0_from_eps(x, t, model(x, t))))

    ref = sample(cfg, model, z, SampleNoise(3, range(len(z)), (2,)), schedule)
    model.reset()
    x = sample(cfg, bare, z, SampleNoise(3, range(len(z)), (2,)), schedule, callback=callback,
               extra_args={"cond": "c"})
    assert torch.equal(x, ref)
    assert len(seen) == planned_nfe(cfg, schedule) and all(e == {"cond": "c"} for e in seen)
    assert [i for i, *_ in steps] == list(range(len(steps))) and len(steps) >= 6
    ts = [t for _, t, *_ in steps]
    if key != "diffusers_heun":      # Heun's scheduler goes back up to the step's start for its correction
        assert ts == sorted(ts, reverse=True)
    for _, _, x0, expect in steps:
        torch.testing.assert_close(x0, expect, rtol=1e-6, atol=1e-6)
    if key in ("heun", "diffusers_heun"):
        assert planned_nfe(cfg, schedule) == 11
