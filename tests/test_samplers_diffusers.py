"""Native DDIM and DPM-Solver++ reproduce diffusers' scheduler loops on a tiny random UNet2DModel.

The same Denoiser (UNetAdapter over the UNet) supplies eps to both loops, so any difference is the
sampler's. diffusers computes its schedule in float32, fewstep in float64: they agree to ~1e-6
of the sample's scale (the float32 resolution); a 1% error in one solver coefficient shows as ~3e-4.
"""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, UNet2DModel
from conftest import group_cfg

from fewstep.backbones.unet import UNetAdapter
from fewstep.denoiser import Denoiser
from fewstep.samplers import sample
from fewstep.samplers.dpmpp import sample_dpmpp
from fewstep.samplers.noise import SampleNoise
from fewstep.schedule import NoiseSchedule, select_timesteps

STEPS = 10


def assert_same_sample(x, ref, tol=1e-5):
    """max |x - ref| <= tol at the sample's scale: a random UNet's eps does not match x, so its samples
    reach |x| ~ 1e2 where float32 (diffusers' schedule precision) resolves ~1e-5."""
    scale = max(1.0, ref.abs().max().item())
    diff = (x - ref).abs().max().item()
    print(f"max |x - ref| = {diff:.2e}, scale {scale:.1f}")
    assert diff <= tol * scale, (diff, scale)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config("linear", 1000)


@pytest.fixture(scope="module")
def model(schedule):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    return Denoiser(UNetAdapter(unet), schedule)


@pytest.fixture(scope="module")
def z():
    return SampleNoise(0, range(2), (1, 16, 16))()


def diffusers_loop(scheduler, model, z, **set_timesteps):
    """The loop of diffusers' pipelines, with our denoiser as the eps model."""
    scheduler.set_timesteps(**set_timesteps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), float(t))
        x = scheduler.step(eps, t, x).prev_sample
    return x, scheduler.timesteps.numpy().astype(np.float64)


def betas(schedule):
    return dict(num_train_timesteps=schedule.N, trained_betas=schedule.betas.tolist())


@torch.no_grad()
def test_ddim_matches_diffusers_ddim_scheduler(model, schedule, z):
    sched = DDIMScheduler(**betas(schedule), clip_sample=False, set_alpha_to_one=True)  # timestep_spacing leading
    ref, ts = diffusers_loop(sched, model, z, num_inference_steps=STEPS)
    assert np.array_equal(ts, select_timesteps(schedule, STEPS, "leading"))
    model.reset()
    x = sample(group_cfg("sampler", {"name": "ddim", "steps": STEPS, "eta": 0.0, "timesteps": "leading"}),
               model, z, None, schedule)
    assert model.nfe == STEPS
    assert_same_sample(x, ref)
    assert ref.abs().max() > 0.1  # not a trivially small sample


@torch.no_grad()
def test_clip_x0_matches_diffusers_clip_sample(model, schedule, z):
    """sampler.clip_x0 is diffusers' clip_sample=True: DDIM with the network's eps beside the clipped x0 (its
    default, use_clipped_model_output=False, and the official Analytic-DPM DDIM), ancestral DDPM with the
    posterior mean at the clipped x0 (the same N(0, I) draws fed to both loops), on the random UNet, whose
    unclipped x0 leaves [-1, 1]."""
    def cfg(name, clip, **kw):
        return group_cfg("sampler", {"name": name, "steps": STEPS, "timesteps": "leading", "clip_x0": clip, **kw})

    sched = DDIMScheduler(**betas(schedule), clip_sample=True, set_alpha_to_one=True)
    sched.set_timesteps(num_inference_steps=STEPS)
    ref = z.clone()
    for t in sched.timesteps:
        ref = sched.step(model(ref, float(t)), t, ref).prev_sample
    x = sample(cfg("ddim", True, eta=0.0), model, z, None, schedule)
    # clipped samples stay within |x| <= ~1, so this absolute 1e-4 is stricter than the unclipped tests' 1e-5 x 1e2
    assert_same_sample(x, ref, tol=1e-4)
    unclipped = sample(cfg("ddim", False, eta=0.0), model, z, None, schedule)
    assert (unclipped - x).abs().max() > 1.0  # the clip is not a no-op here

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda *shape, **kw: torch.randn(z.shape, generator=g)

    sched = DDPMScheduler(**betas(schedule), clip_sample=True, variance_type="fixed_small")
    sched.set_timesteps(num_inference_steps=STEPS)
    g = torch.Generator().manual_seed(7)
    ref = z.clone()
    for t in sched.timesteps:
        ref = sched.step(model(ref, float(t)), t, ref, generator=g).prev_sample
    x = sample(cfg("ddpm", True, var_type="beta_tilde"), model, z, draws(7), schedule)
    assert_same_sample(x, ref, tol=1e-4)
    assert x.abs().max() < 1.0 + 1e-4  # the last step returns the clipped x0


@torch.no_grad()
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmpp_matches_diffusers_dpm_solver(order, model, schedule, z):
    kw = dict(**betas(schedule), algorithm_type="dpmsolver++", solver_order=order, final_sigmas_type="zero")
    # diffusers' default spacing for DPM-Solver ("linspace": linspace(0, N-1, steps + 1)[:-1], never t = 0)
    ref, ts = diffusers_loop(DPMSolverMultistepScheduler(**kw), model, z, num_inference_steps=STEPS)
    assert_same_sample(sample_dpmpp(model, z, ts, schedule, order=order), ref)
    # our linspace spacing (ends at t = 0), given to diffusers as custom timesteps
    ts = select_timesteps(schedule, STEPS, "linspace")
    ref, _ = diffusers_loop(DPMSolverMultistepScheduler(**kw), model, z, timesteps=ts.astype(int).tolist())
    x = sample(group_cfg("sampler", {"name": "dpmpp", "steps": STEPS, "order": order, "timesteps": "linspace",
                                            "lower_order_final": True}), model, z, None, schedule)
    assert_same_sample(x, ref)


@torch.no_grad()
def test_diffusers_sampler_equals_hand_written_unipc_loop(model, schedule, z):
    ref, _ = diffusers_loop(UniPCMultistepScheduler(**betas(schedule), solver_order=3), model, z,
                            num_inference_steps=STEPS)
    model.reset()
    cfg = group_cfg("sampler", {"name": "diffusers", "scheduler": "UniPCMultistepScheduler", "steps": STEPS,
                                       "kwargs": {"solver_order": 3}})
    x = sample(cfg, model, z, SampleNoise(0, range(2), (1, 16, 16)), schedule)
    assert model.nfe == STEPS
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
