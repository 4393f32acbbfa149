"""Noise schedules and timestep selection, checked against diffusers and the closed forms."""
import math

import numpy as np
import pytest

from fewstep.schedule import NoiseSchedule, make_betas, select_timesteps


@pytest.mark.parametrize("kind,dkind", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_alpha_bar_matches_diffusers(kind, dkind):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=dkind).alphas_cumprod.double().numpy()
    s = NoiseSchedule.from_config(kind)
    np.testing.assert_allclose(s.alpha_bar, ref, rtol=1e-4, atol=1e-9)  # diffusers computes in float32


def test_sigma_lambda_relations():
    s = NoiseSchedule.from_config("linear")
    ab = s.alpha_bar
    np.testing.assert_allclose(s.sigmas, np.sqrt((1 - ab) / ab), rtol=1e-12)
    np.testing.assert_allclose(s.lambdas, 0.5 * np.log(ab / (1 - ab)), rtol=1e-12)
    t = np.array([0.0, 10.5, 999.0])
    np.testing.assert_allclose(s.sigma_to_t(np.exp(s.log_sigma_at(t))), t, atol=1e-9)
    assert s.alpha_bar_at(-1) == 1.0
    assert s.alpha_bar_at(17) == pytest.approx(ab[17], rel=1e-12)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50])
def test_spacings_match_diffusers(spacing, steps):
    from diffusers import DDIMScheduler

    d = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    d.set_timesteps(steps)
    ours = select_timesteps(NoiseSchedule.from_config("linear"), steps, spacing)
    np.testing.assert_array_equal(ours.astype(int), d.timesteps.numpy())


def test_logsnr_is_uniform_in_lambda():
    s = NoiseSchedule.from_config("linear")
    ts = select_timesteps(s, 12, "logsnr")
    lam = -s.log_sigma_at(ts)
    assert ts[0] == pytest.approx(999) and ts[-1] == pytest.approx(0)
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 5, 10, 25])
def test_linspace_without_endpoint_matches_dpmsolver(steps):
    """endpoint=False is DPMSolverMultistepScheduler's linspace: steps + 1 points, the clean end dropped."""
    from diffusers import DPMSolverMultistepScheduler

    d = DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    d.set_timesteps(steps)
    ours = select_timesteps(NoiseSchedule.from_config("linear"), steps, "linspace", endpoint=False)
    np.testing.assert_array_equal(ours.astype(int), d.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["linspace", "quadratic", "logsnr", "karras"])
def test_endpoint_false_is_the_grid_of_one_more_step_without_its_clean_end(spacing):
    s = NoiseSchedule.from_config("linear")
    with_end = select_timesteps(s, 7, spacing)
    without = select_timesteps(s, 6, spacing, endpoint=False)
    assert with_end[-1] == pytest.approx(0) and without[-1] > 0
    np.testing.assert_allclose(without, with_end[:-1])
    lam = -s.log_sigma_at(select_timesteps(s, 6, "logsnr", endpoint=False))
    lam_end = -s.log_sigma_at(0.0)   # the dropped point continues the uniform lambda grid
    np.testing.assert_allclose(np.diff(np.append(lam, lam_end)), (lam_end - lam[0]) / 6, rtol=1e-6)
    for own in ("leading", "trailing"):  # these define their own end
        np.testing.assert_array_equal(select_timesteps(s, 6, own, endpoint=False), select_timesteps(s, 6, own))


def test_karras_sigmas():
    s = NoiseSchedule.from_config("linear")
    ts = select_timesteps(s, 8, "karras")
    sig = np.exp(s.log_sigma_at(ts))
    r = np.linspace(0, 1, 8)
    ref = (s.sigma_max ** (1 / 7) + r * (s.sigma_min ** (1 / 7) - s.sigma_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(sig, ref, rtol=1e-6)


def test_quadratic_and_order():
    s = NoiseSchedule.from_config("linear")
    ts = select_timesteps(s, 10, "quadratic")
    assert np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(ts[::-1], np.round(np.linspace(0, math.sqrt(800), 10) ** 2))


def test_errors():
    s = NoiseSchedule.from_config("linear")
    with pytest.raises(ValueError, match="unknown timestep spacing 'bogus'"):
        select_timesteps(s, 10, "bogus")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        select_timesteps(s, 0, "linspace")
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("sigmoid")
