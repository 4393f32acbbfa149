"""Analytic-DPM (variance=analytic, task=gamma, metrics=nll), checked on the 2-D Gaussian mixture whose
eps(x, t) is exact, so Gamma_t has a reference value computed by numerical integration."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fewstep.config import ConfigError, group
from fewstep.backbones.gmm import GaussianMixture, GMMExact
from fewstep.denoiser import Denoiser
from fewstep.metrics.nll import discretized_gaussian_log_likelihood, nll_bpd, nll_rule
from fewstep.schedule import NoiseSchedule, select_timesteps
from fewstep.strategies.variance import (AnalyticVariance, FixedVariance, GammaMismatch, GammaMissing, GammaStats,
                                         build_variance, check_timesteps, dp_trajectory, estimate_gamma, find_gamma, gamma_filename,
                                         least_cost_path, jump_cost, load_gamma, model_id, save_gamma, split_reliable,
                                         trajectory_cost, validate_variance_cfg)
from fewstep.tasks.gamma import estimate_to_file


def exact_gamma(mixture, schedule, t: int) -> float:
    """Gamma_t = int p_t(x) ||eps*(x)||^2 / d dx by the midpoint rule on a grid fine w.r.t. the components."""
    ab = float(schedule.alpha_bar[t])
    std = math.sqrt(ab * float(mixture.stds.max()) ** 2 + 1 - ab)
    h = std / 6
    hw = math.sqrt(ab) * float(mixture.means.norm(dim=1).max()) + 8 * std
    g = torch.arange(-hw, hw + h / 2, h, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    w = mixture.log_prob(pts, ab).exp() * h * h
    assert abs(float(w.sum()) - 1) < 1e-6  # the grid integrates the density exactly
    return float((w * mixture.eps(pts, ab).pow(2).sum(1) / 2).sum())


def batches(x, bs):
    return [x[i: i + bs] for i in range(0, len(x), bs)]


# ----------------------------------------------------------------------------- Gamma estimate

def test_monte_carlo_gamma_matches_exact(model, mixture, schedule):
    ts = [0, 5, 50, 200, 500, 999]
    x0 = mixture.sample(4000, torch.Generator().manual_seed(1))
    st = estimate_gamma(model, batches(x0, 1000), schedule, ts, torch.Generator().manual_seed(2))
    assert st.count == 4000 and list(st.timesteps) == ts
    for t, g, se in zip(ts, st.gamma, st.stderr):
        ref = exact_gamma(mixture, schedule, t)
        assert 0 < se < 0.02
        assert abs(g - ref) < 4 * se, (t, g, ref, se)


def test_gamma_stats_merge_and_stderr():
    rng = np.random.default_rng(0)
    g = rng.random((50, 3))
    a = GammaStats([1, 2, 3], g[:20].sum(0), (g[:20] ** 2).sum(0), 20)
    b = GammaStats([1, 2, 3], g[20:].sum(0), (g[20:] ** 2).sum(0), 30)
    m = a.merge(b)
    assert np.allclose(m.gamma, g.mean(0)) and np.allclose(m.stderr, g.std(0, ddof=1) / math.sqrt(50))
    assert np.allclose(GammaStats.from_state_dict(m.state_dict()).gamma, m.gamma)
    assert list(check_timesteps(300, 1000)) == [0, 300, 600, 900, 999] and len(check_timesteps("all", 10)) == 10
    for bad in ("some", 0, [3, 1000], [1.5]):
        with pytest.raises(ValueError, match="timesteps"):
            check_timesteps(bad, 1000)


def test_estimate_to_file_resumes_exactly(model, mixture, schedule, tmp_path):
    x0 = mixture.sample(96, torch.Generator().manual_seed(3))
    kw = dict(mid="m", dataset="gmm", timesteps=[0, 300, 999], batch_size=16, seed=7, progress=False)
    full = estimate_to_file(model, x0, schedule, tmp_path / "a" / "g.safetensors", **kw)
    path = tmp_path / "b" / "g.safetensors"
    assert estimate_to_file(model, x0, schedule, path, max_batches=2, **kw) is None   # "interrupted"
    assert (path.parent / "g.safetensors.partial0of1").exists() and not path.exists()
    resumed = estimate_to_file(model, x0, schedule, path, **kw)
    assert torch.equal(resumed["gamma"], full["gamma"]) and torch.equal(resumed["stderr"], full["stderr"])
    assert resumed["M"] == 96 and not (path.parent / "g.safetensors.partial0of1").exists()


def test_rank_blocks_add_up_to_one_process(model, mixture, schedule, tmp_path):
    """Rank r of W takes the contiguous block parallel.shard(n_batches, r, W) of the batches, each point with
    the noise it gets in one process: the ranks' sums are the single-process sums (5 batches, the last one
    short; W = 6 leaves a rank idle), and a rank's interrupted estimate resumes exactly."""
    from fewstep.tasks.gamma import estimate_shard, rank_batches

    x0 = mixture.sample(38, torch.Generator().manual_seed(4))
    kw = dict(mid="m", dataset="gmm", timesteps=[0, 100, 999], batch_size=8, seed=5, progress=False)
    one = estimate_to_file(model, x0, schedule, tmp_path / "one" / "g.safetensors", **kw)
    assert [list(rank_batches(38, 8, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(rank_batches(38, 8, r, 6)) for r in range(6)] == [1, 1, 1, 1, 1, 0]
    for world in (2, 3, 6):
        parts = [estimate_shard(model, x0, schedule, tmp_path / f"w{world}" / "g.safetensors", rank=r, world=world,
                                **kw) for r in range(world)]
        total = parts[0]
        for p in parts[1:]:
            total = total.merge(p)
        assert total.count == 38
        np.testing.assert_allclose(total.gamma, one["gamma"].numpy(), rtol=1e-12)
        np.testing.assert_allclose(total.stderr, one["stderr"].numpy(), rtol=1e-9)
    path = tmp_path / "resume" / "g.safetensors"
    assert estimate_shard(model, x0, schedule, path, rank=1, world=2, max_batches=1, **kw) is None
    resumed = estimate_shard(model, x0, schedule, path, rank=1, world=2, **kw)
    fresh = estimate_shard(model, x0, schedule, tmp_path / "fresh" / "g.safetensors", rank=1, world=2, **kw)
    assert resumed.count == fresh.count == 14 and np.array_equal(resumed.sum, fresh.sum)


def test_gamma_task_on_two_processes_equals_one(compose, tmp_path, monkeypatch):
    """task=gamma with trainer=ddp_cpu trainer.devices=2 (gloo) goes through parallel.run_parallel, as
    evaluation does, and writes the Gamma file of one process up to the float64 summation order; one
    process runs without Fabric. (run_parallel spawns the ranks: a forked child hangs in the parent's
    OpenMP pool once the parent has used it.)"""
    from conftest import make_tiny_unet
    from fewstep import parallel
    from fewstep.tasks import gamma as gamma_task

    launched = []

    def spy(trainer, fn, *args):
        launched.append(fn.__name__)
        return parallel.run_parallel(trainer, fn, *args)

    monkeypatch.setattr(gamma_task, "run_parallel", spy)
    unet = tmp_path / "unet"
    make_tiny_unet(sample_size=8, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(unet)
    # 22 points in batches of 8: rank 0 takes batches 0 and 1, rank 1 the short batch 2 (noise after 2 batches')
    base = ["task=gamma", "dataset=digits", f"backbone.pretrained={unet}", "task.M=22", "task.batch_size=8",
            "task.timesteps=250", "seed=3", "device=cpu", "logger=none"]
    one = gamma_task.run(compose(base + [f"task.out_dir={tmp_path / 'one'}"]))
    assert launched == [] and "world_size" not in one
    two = gamma_task.run(compose(base + [f"task.out_dir={tmp_path / 'two'}", "trainer=ddp_cpu", "trainer.devices=2"]))
    assert launched == ["gamma_rank"] and two["world_size"] == 2
    g1, g2 = load_gamma(one["gamma_path"]), load_gamma(two["gamma_path"])
    assert g1["world_size"] == 1 and g2["world_size"] == 2 and g1["M"] == g2["M"] == 22
    assert g1["model_id"] == g2["model_id"] and torch.equal(g1["timesteps"], g2["timesteps"])
    # the same points and noise on each rank; the network's float32 outputs differ by round-off between one
    # process and two single-threaded ranks (CPU kernels block by thread count: 1e-7 relative measured), a
    # shard with other points or noise by far more
    np.testing.assert_allclose(g2["gamma"].numpy(), g1["gamma"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(g2["stderr"].numpy(), g1["stderr"].numpy(), rtol=1e-5)
    assert not list((tmp_path / "two").glob("*.partial*"))                # every rank dropped its partial


# ----------------------------------------------------------------------------- variance formulas

def theorem1(ab_t, ab_s, lam2, gamma, half_range=1.0):
    """Bao et al. 2022, Theorem 1 for the jump t -> s (alpha_{t|s} = ab_t/ab_s) and Theorem 2's bounds."""
    bb_t, bb_s, alpha_ts = 1 - ab_t, 1 - ab_s, ab_t / ab_s
    k = (math.sqrt(bb_t / alpha_ts) - math.sqrt(bb_s - lam2)) ** 2
    sigma2 = lam2 + k * (1 - gamma)
    upper1 = lam2 + k                                                                    # Gamma >= 0
    upper2 = lam2 + (math.sqrt(ab_s) - math.sqrt(bb_s - lam2) * math.sqrt(ab_t / bb_t)) ** 2 * half_range ** 2
    return min(max(sigma2, lam2), min(upper1, upper2)), lam2, min(upper1, upper2)


def random_schedule(rng, n=50):
    return NoiseSchedule(np.sort(rng.uniform(1e-4, 0.08, n)))


def test_variance_equals_theorem1_on_random_schedules():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sch = random_schedule(rng)
        gamma = rng.uniform(-0.2, 1.2, sch.N)       # also outside [0, 1]: the clip must act
        rule = AnalyticVariance(sch, gamma)
        sub = np.sort(rng.choice(sch.N, size=6, replace=False))[::-1]
        eta = rng.uniform(0, 1)
        for t, s in zip(sub[:-1], sub[1:]):
            ab_t, ab_s = sch.alpha_bar[t], sch.alpha_bar[s]
            bt = (1 - ab_t / ab_s) * (1 - ab_s) / (1 - ab_t)
            for lam2 in (bt, eta ** 2 * bt, 0.0):
                ref, lo, hi = theorem1(ab_t, ab_s, lam2, gamma[t])
                got = rule(t, s, lam2)
                assert got == pytest.approx(ref, rel=1e-10, abs=1e-15)
                assert lo - 1e-15 <= got <= hi + 1e-15
            # DDPM (lam2 = beta_tilde): beta_tilde + ab_s beta_{t|s}^2 / bb_t^2 clip(bb_t/ab_t (1 - Gamma), 0, 1)
            # (DESIGN.md's form; it takes Gamma >= 0, which a Monte Carlo mean of squares always is)
            b, g = 1 - ab_t / ab_s, max(gamma[t], 0.0)
            ddpm = bt + ab_s * b ** 2 / (1 - ab_t) ** 2 * np.clip((1 - ab_t) / ab_t * (1 - g), 0, 1)
            assert rule(t, s, bt) == pytest.approx(ddpm, rel=1e-10)
        # the jump to data: the posterior variance E Cov[x_0 | x_t] / d, clipped (0 <= Gamma <= 1, data in [-1, 1])
        t = int(sub[-1])
        ab_t = sch.alpha_bar[t]
        post = (1 - ab_t) / ab_t * (1 - np.clip(gamma[t], 0, 1))
        assert rule(t, -1, 0.0) == pytest.approx(min(post, 1.0), rel=1e-10)


def test_exact_gamma_variance_is_optimal_per_jump(model, mixture, schedule):
    """With the exact Gamma the rule equals lam2 + c^2 E||x0 - x0_hat||^2 / d measured directly."""
    t, s = 400, 300
    rule = AnalyticVariance(schedule, [exact_gamma(mixture, schedule, t)], [t], data_range=None)
    x0 = mixture.sample(20000, torch.Generator().manual_seed(6)).double()
    ab_t, ab_s = schedule.alpha_bar[t], schedule.alpha_bar[s]
    x_t = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * torch.randn(x0.shape, generator=torch.Generator().manual_seed(7),
                                                                    dtype=torch.float64)
    err = (model.x0(x_t, t) - x0).pow(2).sum(1) / 2
    bt = (1 - ab_t / ab_s) * (1 - ab_s) / (1 - ab_t)
    c2 = (math.sqrt(ab_s) - math.sqrt((1 - ab_s - bt) * ab_t / (1 - ab_t))) ** 2
    direct = bt + c2 * err.mean().item()
    se = c2 * err.std().item() / math.sqrt(len(err))
    assert abs(rule(t, s, bt) - direct) < 4 * se


def test_clip_pixel_cap_and_config(schedule):
    gamma = np.full(schedule.N, 0.5)
    capped = AnalyticVariance(schedule, gamma, clip_pixel=1.0)
    plain = AnalyticVariance(schedule, gamma)
    cap2 = (2 / 255 * math.sqrt(math.pi / 2)) ** 2
    lam2 = 0.0
    assert plain(100, 0, lam2) > cap2 and capped(100, 0, lam2) == pytest.approx(cap2)
    assert capped(100, 50, lam2) == plain(100, 50, lam2) and capped(0, -1, 0.0) == plain(0, -1, 0.0)
    assert capped.uncapped()(100, 0, lam2) == plain(100, 0, lam2)
    with pytest.raises(ValueError, match="lam2 must lie"):
        plain(100, 50, 2.0)
    with pytest.raises(ValueError, match="-1 <= s < t"):
        plain(50, 100, 0.0)


# ----------------------------------------------------------------------------- likelihood bound

def test_discretized_decoder_is_a_distribution():
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, var in [(0.3, 1e-4), (-0.99, 0.05), (1.7, 0.3), (0.0, 1e-7)]:
        p = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), var).exp()
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)


def test_analytic_nll_beats_fixed_variances(model, mixture, schedule):
    ts = select_timesteps(schedule, 10, "linspace")
    gamma = [exact_gamma(mixture, schedule, int(t)) for t in ts]
    rules = {"analytic": AnalyticVariance(schedule, gamma, ts.astype(int), data_range=None),
             "beta": FixedVariance(schedule, "beta"), "beta_tilde": FixedVariance(schedule, "lam2")}
    x0 = mixture.sample(1000, torch.Generator().manual_seed(8))
    out = {k: nll_bpd(model, batches(x0, 500), schedule, ts, r, bins=None, seed=9,
                      return_terms=True) for k, r in rules.items()}
    (a, a_se, a_terms), (b, _, b_terms), (bt, _, bt_terms) = out["analytic"], out["beta"], out["beta_tilde"]
    assert a < b - 2 * a_se and a < bt - 2 * a_se
    # the same noise: every transition is no worse (up to Monte Carlo noise in E||x0 - x0_hat||^2)
    assert all(x <= min(y, z) * 1.02 + 1e-6 for x, y, z in zip(a_terms["transitions"], b_terms["transitions"],
                                                               bt_terms["transitions"]))
    # prior KL(N(sqrt(ab_T) x0, bb_T) || N(0, 1)) in closed form, and the decoder is shared
    ab_T = schedule.alpha_bar[-1]
    prior = 0.5 * ((1 - ab_T) - 1 - math.log(1 - ab_T) + ab_T * x0.double().pow(2).mean()) / math.log(2)
    assert a_terms["prior"] == pytest.approx(float(prior), rel=1e-9)
    assert a_terms["decoder"] == b_terms["decoder"] == bt_terms["decoder"]
    with pytest.raises(ValueError, match="eta > 0"):
        nll_bpd(model, [x0], schedule, ts, rules["beta"], eta=0.0)


def test_nll_noise_follows_each_point_not_the_batches(model, mixture, schedule):
    """Point i's x_t draws come from (seed, i): its bound is the same in any batch layout, and the same for
    the same index in another subset; another seed gives other draws."""
    from fewstep.metrics.nll import nll_points

    ts = select_timesteps(schedule, 5, "linspace")
    rule = FixedVariance(schedule, "beta")
    x0 = mixture.sample(12, torch.Generator().manual_seed(8))
    idx = list(range(100, 112))
    kw = dict(bins=None, seed=3)
    whole, terms = nll_points(model, [x0], schedule, ts, rule, indices=idx, **kw)
    split, _ = nll_points(model, batches(x0, 5), schedule, ts, rule, indices=idx, **kw)
    np.testing.assert_allclose(split, whole, rtol=1e-12)
    order = [7, 2, 11, 0]                              # a subset, in another order, bounded alone
    sub, _ = nll_points(model, [x0[order]], schedule, ts, rule, indices=[idx[i] for i in order], **kw)
    np.testing.assert_allclose(sub, whole[order], rtol=1e-12)
    other, _ = nll_points(model, [x0], schedule, ts, rule, indices=idx, bins=None, seed=4)
    assert not np.allclose(other, whole)
    shifted, _ = nll_points(model, [x0], schedule, ts, rule, **kw)     # default indices 0..11: other draws
    assert not np.allclose(shifted, whole)
    with pytest.raises(ValueError, match="11 indices"):
        nll_points(model, batches(x0, 5), schedule, ts, rule, indices=idx[:11], **kw)


def test_discrete_nll_of_a_unet_is_a_valid_bound(tiny_unet, schedule):
    """Images on the 256-level grid: every term is a KL or -log of a probability, so the bound is >= 0 bits."""
    from fewstep.backbones.unet import UNetAdapter

    model = Denoiser(UNetAdapter(tiny_unet), schedule)
    x0 = torch.randint(0, 256, (6, 1, 16, 16), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1
    rule = AnalyticVariance(schedule, np.full(schedule.N, 0.9))
    ts = select_timesteps(schedule, 3, "linspace")
    mean, se, terms = nll_bpd(model, [x0[:3], x0[3:]], schedule, ts, rule, clip_x0=True, return_terms=True)
    assert math.isfinite(mean) and mean > 0 and se > 0 and len(terms["transitions"]) == 2
    assert all(v >= 0 for v in terms["transitions"]) and terms["decoder"] >= 0 and model.nfe == 2 * 3


def test_paired_difference_matches_points_by_index():
    from fewstep.metrics.nll import mean_and_stderr, paired_difference

    rng = np.random.default_rng(0)
    idx = rng.permutation(1000)[:300]
    a = rng.normal(4.0, 0.5, 300)                       # the between-image spread ...
    b = a + 0.1 + rng.normal(0, 0.01, 300)              # ... is shared by a second rule on the same images
    order = rng.permutation(300)                        # the second run lists its points in another order
    mean, se, n = paired_difference(idx, a, idx[order], b[order])
    d = a - b
    assert n == 300 and mean == pytest.approx(d.mean(), rel=1e-12)
    assert se == pytest.approx(d.std(ddof=1) / math.sqrt(300), rel=1e-12)
    assert se < 0.1 * mean_and_stderr(a)[1]             # far tighter than either run's own standard error
    # only the shared points count; none shared is an error
    mean, _, n = paired_difference(idx[:200], a[:200], idx[100:], b[100:])
    assert n == 100 and mean == pytest.approx((a[100:200] - b[100:200]).mean(), rel=1e-12)
    with pytest.raises(ValueError, match="share no data points"):
        paired_difference([1, 2], [0.0, 0.0], [3], [0.0])
    assert mean_and_stderr(np.array([2.0]))[1] == math.inf


def test_nll_rule_from_config(schedule):
    ddpm = OmegaConf.create({"name": "ddpm", "steps": 10, "var_type": "beta"})
    rule, eta = nll_rule(OmegaConf.create({"name": "fixed"}), ddpm, schedule)
    assert eta == 1.0 and rule(999, 500, 0.1) == pytest.approx(1 - schedule.alpha_bar[999] / schedule.alpha_bar[500])
    with pytest.raises(ValueError, match="sampler=ddpm"):
        nll_rule(None, OmegaConf.create({"name": "dpmpp", "steps": 10}), schedule)
    with pytest.raises(ValueError, match="eta > 0"):
        nll_rule(None, OmegaConf.create({"name": "ddim", "steps": 10, "eta": 0.0}), schedule)


# ----------------------------------------------------------------------------- optimal trajectory

def gaussian_gamma(schedule, s2=0.25):
    """Exact Gamma of data N(0, s2 I): eps* = sqrt(bb) x_t / (ab s2 + bb), E||eps*||^2/d = bb / (ab s2 + bb)."""
    ab = schedule.alpha_bar
    return (1 - ab) / (ab * s2 + 1 - ab)


def test_dp_trajectory_beats_even_spacing(schedule):
    gamma = gaussian_gamma(schedule)
    for K in (2, 3, 10, 50):
        ts = dp_trajectory(gamma, schedule, K)
        assert len(ts) == K and ts[0] == schedule.N - 1 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
        assert np.all(ts == np.round(ts))
        even = select_timesteps(schedule, K, "linspace")
        assert trajectory_cost(gamma, schedule, ts) <= trajectory_cost(gamma, schedule, even) + 1e-12
    with pytest.raises(ValueError, match="2 <= steps"):
        dp_trajectory(gamma, schedule, 1)


def test_dp_is_the_least_cost_path_by_brute_force():
    rng = np.random.default_rng(1)
    sch = random_schedule(rng, 14)
    gamma = rng.uniform(0, 1, sch.N)
    C = jump_cost(gamma, sch)
    for K in (3, 4, 5):
        best = min(sum(C[a, b] for a, b in zip(p[:-1], p[1:]))
                   for mid in itertools.combinations(range(1, sch.N - 1), K - 2) for p in [(0,) + mid + (sch.N - 1,)])
        path = least_cost_path(C, K)
        assert len(path) == K and sum(C[a, b] for a, b in zip(path[:-1], path[1:])) == pytest.approx(best, abs=1e-12)
        assert list(dp_trajectory(gamma, sch, K)[::-1]) == path


def test_dp_unreliable_tail(schedule):
    """Estimated Gamma > 1 from t = 900: the top 2 x 100 timesteps get evenly spaced steps, the rest the DP."""
    gamma = gaussian_gamma(schedule)
    gamma[900:] = 1.001
    assert split_reliable(gamma, 10) == (9, 800, 1, 200)
    ts = dp_trajectory(gamma, schedule, 10)
    assert ts[0] == 999 and ts[1] == 799 and ts[-1] == 0 and len(ts) == 10
    assert list(dp_trajectory(gamma, schedule, 2)) == [999, 0]
    K1, N1, K2, num_bad = split_reliable(gamma, 50)
    ts = dp_trajectory(gamma, schedule, 50)
    assert (K1, N1, K2, num_bad) == (42, 800, 8, 200) and np.sum(ts > N1 - 1) == K2 and len(set(ts)) == 50
    assert np.allclose(np.diff(ts[:K2 + 1][::-1])[1:], 25, atol=1)   # evenly spaced in the tail
    bad = np.full(schedule.N, 1.01)                                  # nothing reliable: even spacing
    assert len(dp_trajectory(bad, schedule, 5)) == 5


# ----------------------------------------------------------------------------- files, ids, config

def test_model_id(tiny_unet, schedule):
    from fewstep.backbones.unet import UNetAdapter

    assert model_id(tiny_unet) == model_id(UNetAdapter(tiny_unet)) and len(model_id(tiny_unet)) == 16
    other = GMMExact(GaussianMixture(radius=0.5), schedule)
    assert model_id(GMMExact(GaussianMixture(), schedule)) == model_id(GMMExact(GaussianMixture(), schedule))
    assert model_id(other) != model_id(GMMExact(GaussianMixture(), schedule))
    before = model_id(tiny_unet)
    with torch.no_grad():
        tiny_unet.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert model_id(tiny_unet) != before


def variance_cfg(**kw):
    base = {"name": "analytic", "_target_": "fewstep.strategies.variance.analytic_dpm", "gamma_path": None, "search_dirs": [], "clip_pixel": 2.0,
            "data_range": [-1.0, 1.0], "dataset": "gmm", "backbone": "gmm_exact", "pretrained": None}
    return OmegaConf.create({**base, **kw})


def test_gamma_files_keyed_by_model(model, mixture, schedule, tmp_path):
    mid = model_id(model.backbone)
    other = model_id(GMMExact(GaussianMixture(radius=0.5), schedule))
    st = estimate_gamma(model, [mixture.sample(64)], schedule, [0, 500, 999])
    path = save_gamma(tmp_path / gamma_filename(mid, "gmm", st.count), st, model_id=mid, dataset="gmm",
                      schedule=schedule)
    rule = build_variance(variance_cfg(search_dirs=[None, str(tmp_path)]), schedule, mid)
    assert rule.path == str(path) and rule.clip_pixel == 2.0 and rule.gamma_at(500) == pytest.approx(st.gamma[1])
    assert build_variance(variance_cfg(gamma_path=str(path), clip_pixel=1), schedule, mid).clip_pixel == 1.0
    assert build_variance(variance_cfg(gamma_path=str(path), clip_pixel=None), schedule, mid).clip_pixel is None
    assert build_variance(group("variance", "fixed"), schedule, mid) is None
    with pytest.raises(GammaMismatch, match=f"holds Gamma of model {mid}.*not of this model {other}"):
        build_variance(variance_cfg(gamma_path=str(path)), schedule, other)
    with pytest.raises(GammaMismatch, match="another noise schedule"):
        build_variance(variance_cfg(gamma_path=str(path)), NoiseSchedule.from_config("cosine", 1000), mid)
    with pytest.raises(GammaMissing, match="`python run.py task=gamma dataset=gmm backbone=gmm_exact`"):
        build_variance(variance_cfg(search_dirs=[str(tmp_path / "empty")]), schedule, other)
    with pytest.raises(ValueError, match="clip_pixel must be"):
        build_variance(variance_cfg(gamma_path=str(path), clip_pixel=-1), schedule, mid)
    with pytest.raises(ValueError, match="names no _target_"):
        build_variance(OmegaConf.create({"name": "learned"}), schedule, mid)
    # lookup prefers the dataset, then the largest M
    st2 = estimate_gamma(model, [mixture.sample(128)], schedule, [0, 999])
    save_gamma(tmp_path / gamma_filename(mid, "gmm", 128), st2, model_id=mid, dataset="gmm", schedule=schedule)
    save_gamma(tmp_path / gamma_filename(mid, "other", 999), st2, model_id=mid, dataset="other", schedule=schedule)
    assert find_gamma(mid, [tmp_path], "gmm").name == gamma_filename(mid, "gmm", 128)


def test_gamma_task_then_analytic_sampling_and_nll(compose, tmp_path):
    """task=gamma end to end on the composed config, then variance=analytic with analytic_dp and metrics=nll."""
    from fewstep.build import build_denoiser
    from fewstep.metrics.nll import evaluate_nll
    from fewstep.samplers import sample
    from fewstep.tasks import gamma as gamma_task

    base = ["dataset=gmm", "backbone=gmm_exact", "device=cpu", "logger=none"]
    cfg = compose(base + ["task=gamma", "task.M=64", "task.batch_size=32", "task.timesteps=50",
                          f"task.out_dir={tmp_path}"])
    res = gamma_task.run(cfg)
    assert res["M"] == 64 and res["n_timesteps"] == 21 and os.path.exists(res["gamma_path"])
    assert gamma_task.run(cfg)["gamma_path"] == res["gamma_path"]          # reused, not recomputed
    with pytest.raises(ValueError, match="task.M=100000 exceeds"):
        gamma_task.run(compose(base + ["task=gamma", "task.M=100000", f"task.out_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="task.M must be"):
        gamma_task.run(compose(base + ["task=gamma", "task.M=0"]))

    cfg = compose(base + ["variance=analytic", f"variance.search_dirs=[{tmp_path}]", "sampler=ddpm",
                          "sampler.steps=6", "sampler.timesteps=analytic_dp", "metrics=nll", "metrics.n_data=200"])
    assert cfg.variance.pretrained is None and cfg.variance.clip_pixel == 2.0      # sampler=ddpm's default
    model = build_denoiser(cfg)
    mid = model_id(model.backbone)
    # the optimal trajectory refuses Gamma interpolated between every 50th timestep, naming the command
    with pytest.raises(GammaMismatch, match=r"has 21 of 1000 .*task.timesteps=all"):
        build_variance(cfg.variance, model.schedule, mid, all_timesteps=True)
    strided = build_variance(cfg.variance, model.schedule, mid)              # even steps: interpolation is fine
    assert strided.path == res["gamma_path"] and not strided.complete
    with pytest.raises(ValueError, match="needs Gamma estimated at every timestep"):
        strided.dp_timesteps(6)
    # the file name keys (model, dataset, M): asking for other timesteps at the same M is not a reuse
    with pytest.raises(ConfigError, match="holds Gamma at 21 timesteps, not the 1000 task.timesteps asks for"):
        gamma_task.run(compose(base + ["task=gamma", "task.M=64", "task.timesteps=all", f"task.out_dir={tmp_path}"]))
    full = gamma_task.run(compose(base + ["task=gamma", "task.M=32", "task.batch_size=32", "task.timesteps=all",
                                          f"task.out_dir={tmp_path}"]))
    assert full["n_timesteps"] == 1000
    assert build_variance(cfg.variance, model.schedule, mid).path == res["gamma_path"]   # largest M
    rule = build_variance(cfg.variance, model.schedule, mid, all_timesteps=True)        # the complete file first
    assert rule.path == full["gamma_path"] and rule.complete
    from fewstep.build import explicit_timesteps

    x = sample(cfg.sampler, model, torch.randn(100, 2, generator=torch.Generator().manual_seed(0)), None,
               model.schedule, variance=rule, timesteps=explicit_timesteps(cfg.sampler, rule))
    assert x.shape == (100, 2) and torch.isfinite(x).all() and model.nfe == 6
    out, points = evaluate_nll(cfg, model, rule)
    assert out["nll_n"] == 200 and out["nll_steps"] == 6 and math.isfinite(out["nll_bpd"]) and out["nll_bpd_se"] > 0
    # the per-point bounds behind the summary, each with its own index in the split
    assert points["bpd"].shape == (200,) and len(set(points["index"].tolist())) == 200
    assert points["bpd"].mean() == pytest.approx(out["nll_bpd"], rel=1e-12)
    assert points["bpd"].std(ddof=1) / math.sqrt(200) == pytest.approx(out["nll_bpd_se"], rel=1e-12)


def test_evaluate_writes_each_points_bound_next_to_metrics(compose, tmp_path):
    """metrics=nll through the evaluate task: nll_bpd.npz holds the bound of every point, and its mean is the
    reported nll_bpd; two rules on the same points can then be compared pairwise."""
    from fewstep.metrics.nll import PER_POINT_FILE, paired_difference
    from fewstep.tasks import evaluate

    base = ["dataset=gmm", "backbone=gmm_exact", "device=cpu", "logger=none", "sampler=ddpm", "sampler.steps=8",
            "metrics=nll", "metrics.n_data=120", "n_samples=64", "batch_size=64"]
    runs = {}
    for var_type in ("beta", "beta_tilde"):
        out = tmp_path / var_type
        res = evaluate.run(compose(base + [f"sampler.var_type={var_type}"]), out=out)
        pts = np.load(out / PER_POINT_FILE)
        assert pts["bpd"].shape == (120,) and pts["index"].shape == (120,)
        assert pts["bpd"].mean() == pytest.approx(res["nll_bpd"], rel=1e-12)
        assert json.loads((out / "metrics.json").read_text())["nll_n"] == 120
        runs[var_type] = pts
    np.testing.assert_array_equal(runs["beta"]["index"], runs["beta_tilde"]["index"])   # the same points
    diff, se, n = paired_difference(runs["beta"]["index"], runs["beta"]["bpd"],
                                    runs["beta_tilde"]["index"], runs["beta_tilde"]["bpd"])
    assert n == 120 and diff == pytest.approx(runs["beta"]["bpd"].mean() - runs["beta_tilde"]["bpd"].mean(), rel=1e-9)
    # fewer points in smaller batches: the points it shares with the first run get the same bounds
    out = tmp_path / "subset"
    evaluate.run(compose(base[:-3] + ["sampler.var_type=beta", "metrics.n_data=50", "metrics.batch_size=16",
                                      "n_samples=64", "batch_size=64"]), out=out)
    sub = np.load(out / PER_POINT_FILE)
    assert set(sub["index"].tolist()) < set(runs["beta"]["index"].tolist())
    full = dict(zip(runs["beta"]["index"].tolist(), runs["beta"]["bpd"].tolist()))
    np.testing.assert_allclose(sub["bpd"], [full[i] for i in sub["index"].tolist()], rtol=1e-12)


def test_clip_pixel_default_is_resolved_with_the_config():
    """variance.clip_pixel follows the sampler when the config is built (2 for ddpm, 1 for ddim, none for an
    ODE sampler, where validation refuses analytic variance anyway); the rule only ever sees a number."""
    from conftest import compose_cfg

    for sampler, cap in (("ddpm", 2.0), ("ddim", 1.0), ("dpmpp", None)):
        assert compose_cfg(["variance=analytic", f"sampler={sampler}"]).variance.clip_pixel == cap
    assert compose_cfg(["variance=analytic", "sampler=ddpm", "variance.clip_pixel=1.5"]).variance.clip_pixel == 1.5
    with pytest.raises(ValueError, match="clip_pixel must be null or a number"):
        validate_variance_cfg(OmegaConf.create({"name": "analytic", "clip_pixel": "auto"}))
