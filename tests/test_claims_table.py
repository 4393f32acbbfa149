"""experiments/claims/table.py: each claim's verdict follows from the archived sweep data by its stated rule."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("claims_table", ROOT / "experiments" / "claims" / "table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sweep(root: Path, name: str, rows):
    (root / name).mkdir(parents=True)
    rows = [dict(job=str(i), overrides="", **r) for i, r in enumerate(rows)]
    pd.DataFrame(rows).to_csv(root / name / "summary.csv", index=False)


def skip_rows(best_by_nfe, base=20.0, se=0.3, grid=(0.5, 0.7, 0.8, 0.9, 1.1, 1.2)):
    """rho rows whose paired FID difference is a parabola with its minimum at best_by_nfe[nfe] (80 (rho - best)^2 minus its value at 1)."""
    rows = []
    for nfe, best in best_by_nfe.items():
        for rho in grid:
            d = 80 * (rho - best) ** 2 - 80 * (1 - best) ** 2
            rows.append(dict(sampler="dpmpp", steps=nfe, nfe=nfe, rho_bottom=rho, fid=base + d, fid_diff=d, fid_diff_se=se))
    return rows


def test_skip_tuning_verdicts(table, tmp_path):
    sweep(tmp_path / "a", "skip_dpmpp", skip_rows({5: 0.7, 10: 0.8, 20: 0.9}))
    claim, _, measured, verdict = table.row_skip_ode(tmp_path / "a")
    assert verdict.startswith("reproduced (3 of 3") and "5: rho 0.7, -7.20 +- 0.30 (-36%)" in measured
    sweep(tmp_path / "b", "skip_dpmpp", skip_rows({5: 0.7, 10: 1.0, 20: 1.0}))
    assert table.row_skip_ode(tmp_path / "b")[3].startswith("partly (1 of 3")
    sweep(tmp_path / "c", "skip_dpmpp", skip_rows({5: 1.2, 10: 1.1, 20: 1.0}))
    assert table.row_skip_ode(tmp_path / "c")[3].startswith("reversed")
    sweep(tmp_path / "d", "skip_dpmpp", skip_rows({5: 0.8}, se=5.0))          # below 1 but within the noise
    assert table.row_skip_ode(tmp_path / "d")[3].startswith("not reproduced")


def test_rho_law_is_fitted_from_the_best_rho_per_nfe(table, tmp_path):
    C, alpha = 0.6, 0.5
    best = {m: round(1 - C / m ** alpha, 2) for m in (5, 10, 20)}
    fine = tuple(np.round(np.arange(0.5, 1.0, 0.01), 2))
    sweep(tmp_path, "skip_dpmpp", skip_rows(best, grid=fine))
    rows = []
    for m in (8, 15, 30, 50):
        b = round(1 - C / m ** alpha, 2)
        rows += [dict(sampler="dpmpp", steps=m, nfe=m, rho_bottom=r, fid=20 + 80 * (r - b) ** 2, fid_diff=80 * (r - b) ** 2 - 80 * (1 - b) ** 2,
                      fid_diff_se=0.1) for r in np.round(np.arange(0.5, 1.0, 0.01), 2)]
    sweep(tmp_path, "skip_dpmpp_m", rows)
    _, _, measured, verdict = table.row_rho_law(tmp_path)
    assert verdict.startswith("reproduced (1 of 1 samplers") and "M=50: 0.92" in measured
    fit = measured.split("; fit ")[1]
    c, a = float(fit.split("C = ")[1].split(" ")[0]), float(fit.split("alpha = ")[1].split(" ")[0])
    assert c == pytest.approx(C, abs=0.03) and a == pytest.approx(alpha, abs=0.03)   # the grid's 0.01 step
    # a sampler whose rho* is 1 at every M is reported, not counted; one whose rho* stays put breaks the law
    ddim = [dict(r, sampler="ddim") for r in skip_rows({5: 1.0, 10: 1.0, 20: 1.0})]
    sweep(tmp_path, "skip_ddim", ddim)
    _, _, measured, verdict = table.row_rho_law(tmp_path)
    assert verdict.startswith("reproduced (1 of 1 samplers") and "DDIM M=5: 1, M=10: 1, M=20: 1; best rho_bottom is 1" in measured
    heun = [dict(r, sampler="heun") for r in skip_rows({5: 0.8, 10: 0.8, 20: 0.8})]
    sweep(tmp_path, "skip_heun", heun)
    assert table.row_rho_law(tmp_path)[3].startswith("partly (1 of 2 samplers")


def test_a_finer_sweep_joins_its_sampler_s_rho_sweep(table, tmp_path):
    """skip_<sampler>_fine (finer rho near the optimum, paired with its own base on the same noise) is read with
    skip_<sampler>: its rho can be the best one, and it counts in the best-of-k bound."""
    sweep(tmp_path, "skip_dpmpp", skip_rows({5: 0.65}, grid=(0.5, 0.6, 0.7, 0.8, 0.9, 1.1)))
    sweep(tmp_path, "skip_dpmpp_fine", skip_rows({5: 0.65}, grid=(0.55, 0.65)))
    _, _, measured, verdict = table.row_skip_ode(tmp_path)
    assert "5: rho 0.65, -9.80 +- 0.30 (-49%)" in measured and verdict.startswith("reproduced (1 of 1")
    assert table.z_best_of(8) > table.z_best_of(6)   # the 8 rho values tried at 5 NFE set the bound
    best, width = table._best_by_m(tmp_path, "dpmpp")
    assert best[5][0] == 0.65 and width[5] == pytest.approx(0.05)


def test_rho_law_reads_a_tie_as_rho_one(table, tmp_path):
    """A best rho within the noise of rho = 1 is no point of the law: with no other, nothing is fitted."""
    sweep(tmp_path, "skip_dpmpp", skip_rows({5: 0.95, 10: 0.95, 20: 0.95}, se=2.0, grid=(0.9, 0.95, 1.05)))
    _, _, measured, verdict = table.row_rho_law(tmp_path)
    assert verdict.startswith("not reproduced (rho* = 1 at every M)")
    assert "M=5: 0.95 (-0.20 +- 2.00, not significant)" in measured and "no fit" in measured


def skip_norm_job(job: Path, sampler: str, worst: float):
    """A task=skip_norms job folder: 3 evaluations x 2 skips, plain and linear; the plain prop is worst at skip 1
    of the last evaluation, 0.5 elsewhere (the linear variant 0.4 everywhere)."""
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(f"sampler:\n  name: {sampler}\n  steps: 10\nskip:\n  name: linear\n"
                                                 "  rho_bottom: 0.8\n")
    rows = [dict(variant=v, step=k, sampler_step=k, t=900 - 400 * k, depth=i, level=i,
                 prop=(worst if (k, i) == (2, 1) else 0.5) if v == "plain" else 0.4)
            for v in ("plain", "linear") for k in range(3) for i in range(2)]
    pd.DataFrame(rows).to_csv(job / "skip_norms.csv", index=False)


def test_deepcache_rows(table, tmp_path):
    sweep(tmp_path, "deepcache_base", [dict(sampler="ddim", steps=100, fid=10.0, macs_per_sample=100.0, wall_time_s=100.0)])
    rows = []
    for n, wall in ((2, 1.5), (3, 1.7), (5, 1.9), (10, 2.1)):
        for sched, d in (("uniform", 0.2 * n), ("nonuniform", 0.1 * n if n >= 5 else 0.2 * n)):
            rows.append(dict(sampler="ddim", steps=100, cache="deepcache", interval=n, schedule=sched, fid=10 + d,
                             fid_diff=d, fid_diff_se=0.1, macs_per_sample=100.0 / (1 + 0.5 * n), wall_time_s=100 / wall))
    sweep(tmp_path, "deepcache", rows)
    _, _, measured, verdict = table.row_deepcache_speed(tmp_path)
    assert "N=2: 2.00x MACs, 1.50x wall, FID +0.40 +- 0.10" in measured
    assert verdict.startswith("partly")      # N = 10: +2.0 FID is 20% of the base 10: more than the rule's 10%
    _, _, measured, verdict = table.row_deepcache_nonuniform(tmp_path)
    assert verdict.startswith("reproduced") and "N=10: non-uniform - uniform -1.00 +- 0.14 (s.e. an upper bound)" in measured
    # the paired sweep (non-uniform jobs paired with the uniform job at their N) takes precedence
    sweep(tmp_path, "deepcache_nonuniform", [dict(sampler="ddim", steps=100, cache="deepcache", interval=n,
                                                  schedule="nonuniform", fid=10.0, fid_diff=d, fid_diff_se=0.2)
                                             for n, d in ((5, 0.1), (10, 0.9))])
    _, _, measured, verdict = table.row_deepcache_nonuniform(tmp_path)
    assert verdict.startswith("reversed") and "N=5: non-uniform - uniform +0.10 +- 0.20 (paired)" in measured
    assert "N=10: non-uniform - uniform +0.90 +- 0.20 (paired)" in measured


def test_analytic_fid_row(table, tmp_path):
    sweep(tmp_path, "analytic_clipfalse", [dict(sampler=s, steps=k, variance="analytic", fid=10, fid_diff=-1.0, fid_diff_se=0.2)
                                           for s in ("ddpm", "ddim") for k in (10, 25)])
    sweep(tmp_path, "analytic_cliptrue", [dict(sampler="ddim", steps=10, variance="analytic", fid=10, fid_diff=0.8, fid_diff_se=0.2)])
    _, _, measured, verdict = table.row_analytic_fid(tmp_path)
    assert verdict == "partly" and "DDIM K=10 clip: +0.80 +- 0.20" in measured


def test_composition_rows_read_the_joint_bootstrap(table, tmp_path):
    with pytest.raises(table.Missing):
        table.row_compose_guided(tmp_path)
    with pytest.raises(table.Missing):
        table.row_compose(tmp_path)
    res = {"factors": ["rho_bottom", "cache", "variance", "guidance"], "n_samples": 500, "fid_base": 5.0,
           "on": {"rho_bottom": "0.800", "cache": "deepcache", "variance": "analytic", "guidance": "cfg"},
           "single": {"rho_bottom": [-1.0, 0.2], "cache": [2.0, 0.3], "variance": [0.5, 0.2], "guidance": [1.0, 0.2]},
           "all": [4.0, 0.5], "sum_of_singles": 2.5}
    for inter, want in (([1.5, 0.4], "not reproduced (less than additive)"), ([0.3, 0.7], "not reproduced (inconclusive"),
                        ([0.1, 0.2], "reproduced")):
        (tmp_path / "compose_guided_interaction.json").write_text(json.dumps(dict(res, interaction=inter)))
        _, _, measured, verdict = table.row_compose_guided(tmp_path)
        assert "rho_bottom 0.800 -1.00 +- 0.20" in measured and "CFG w = 1.5 +1.00 +- 0.20" in measured
        assert f"all minus that sum {inter[0]:+.2f} +- {inter[1]:.2f} (joint paired bootstrap)" in measured
        assert verdict.startswith(want), verdict
    (tmp_path / "compose_interaction.json").write_text(json.dumps(dict(res, interaction=[0.1, 0.2])))
    claim, _, measured, _ = table.row_compose(tmp_path)
    assert claim.startswith("Composition: the gains") and measured.startswith("unconditional model, base FID 5.00")


def test_trajectory_and_nll_rows_read_the_bounds(table, tmp_path):
    even = [dict(sampler="ddpm", steps=k, nll_steps=k, variance="analytic", nll_bpd=b, nll_bpd_se=0.04)
            for k, b in ((10, 5.5), (50, 4.5))]
    fixed = [dict(sampler="ddpm", steps=k, nll_steps=k, var_type=v, variance="fixed", nll_bpd=b, nll_bpd_se=0.02)
             for k, v, b in ((10, "beta", 6.8), (10, "beta_tilde", 98.0), (50, "beta", 5.4), (50, "beta_tilde", 14.6))]
    sweep(tmp_path, "analytic_nll", fixed)
    sweep(tmp_path, "analytic_nll_a", even)
    sweep(tmp_path, "analytic_nll_full", [dict(sampler="ddpm", steps=1000, nll_steps=1000, nll_bpd=3.88, nll_bpd_se=0.04)])
    sweep(tmp_path, "analytic_nll_dp", [dict(r, nll_bpd=r["nll_bpd"] - d) for r, d in zip(even, (0.9, 0.7))])
    _, _, measured, verdict = table.row_trajectory(tmp_path)
    assert verdict.startswith("reproduced") and "K=10: 4.600 vs 5.500 (-0.90 +- 0.06)" in measured
    _, _, measured, verdict = table.row_analytic_nll(tmp_path)   # analytic below the better fixed (beta) bound
    assert "K=10: 5.500 vs 6.800 (-1.30 +- 0.04)" in measured
    assert "1000-step DDPM (beta) bound 3.880 is matched at K = 50 (20x fewer steps)" in measured   # by the DP's 3.8
    assert verdict.startswith("reproduced")
    sweep(tmp_path, "analytic_dp", [dict(sampler="ddpm", steps=10, fid=30.0, fid_diff=12.0, fid_diff_se=1.0)])
    _, _, measured, verdict = table.row_trajectory(tmp_path)
    assert "FID(DP) - FID(even steps): DDPM K=10: +12.00 +- 1.00 paired" in measured and verdict.startswith("reproduced")


def test_a_claim_without_its_sweep_is_not_run(table, tmp_path):
    rows = table.claims(tmp_path, None, [])
    assert len(rows) == 14 and all(r[3] == "not run" for r in rows)
    assert rows[0][2] == "not run (no skip_* in the data)"


def test_guidance_row_reads_the_paired_sweeps(table, tmp_path):
    base = [dict(guidance="cfg", guidance_scale=w, fid=f, fid_se=1.0, recall=rc, class_accuracy=a)
            for w, f, rc, a in ((0.0, 18, 0.9, 0.12), (1.0, 4, 0.89, 0.77), (2.0, 8, 0.8, 0.92), (4.0, 20, 0.66, 0.98))]
    sweep(tmp_path, "guidance_base", base)
    sweep(tmp_path, "guidance_interval", [dict(r, guidance_interval="[100,700]", fid=r["fid"] - 1, fid_diff=-1.0,
                                               fid_diff_se=0.3) for r in base])
    _, _, measured, verdict = table.row_guidance(tmp_path, [])
    assert "FID lowest at w = 1 (4.00)" in measured and "(paired): w=2: -1.00 +- 0.30, w=4: -1.00 +- 0.30" in measured
    assert verdict.startswith("reproduced")


def test_sde_skip_norms_mechanism_nll_and_convergence_rows(table, tmp_path):
    # SDE: rho 0.9 significantly worse and rho 1 best at every step count -> reproduced
    sweep(tmp_path, "skip_ddpm", [dict(sampler="ddpm", steps=k, nfe=k, rho_bottom=r, fid=30 + d, fid_diff=d, fid_diff_se=0.2)
                                  for k in (10, 20) for r, d in ((0.8, 3.0), (0.9, 1.0), (1.1, 0.5))])
    _, _, measured, verdict = table.row_sde(tmp_path)
    assert verdict.startswith("reproduced") and "rho 0.9: +1.00 +- 0.20" in measured
    # skip norms: every (skip, evaluation) pair of each job's skip_norms.csv; one pair >= 1 breaks a run's claim
    for job, (sampler, worst) in enumerate((("dpmpp", 0.99), ("ddim", 1.2))):
        skip_norm_job(tmp_path / "skip_norms" / str(job), sampler, worst)
    _, _, measured, verdict = table.row_skip_norms(tmp_path)
    assert verdict.startswith("partly") and "dpmpp 10 steps: 0 of 6 >= 1, max 0.990 (i1, t 100)" in measured
    assert "ddim 10 steps: 1 of 6 >= 1, max 1.200 (i1, t 100)" in measured
    sweep(tmp_path, "denoise_loss", [dict(skip="linear", rho_bottom=0.7, **{
        "rel_pixel_eps/all": 0.05, "rel_pixel_eps/all_se": 0.01, "rel_feature/low": -0.01, "rel_feature/low_se": 0.01,
        "rel_feature/mid": -0.06, "rel_feature/mid_se": 0.01, "rel_feature/high": 0.01, "rel_feature/high_se": 0.01})])
    _, _, measured, verdict = table.row_mechanism(tmp_path)
    assert verdict.startswith("reproduced") and "pixel +5.0 +- 1.0%" in measured
    nll = [dict(sampler="ddpm", nll_steps=k, nll_bpd=b, nll_bpd_se=0.01, variance="fixed") for k, b in ((10, 5.0), (100, 4.0))]
    sweep(tmp_path, "analytic_nll", nll)
    sweep(tmp_path, "analytic_nll_a", [dict(r, nll_bpd=r["nll_bpd"] - 1.5, variance="analytic") for r in nll])
    sweep(tmp_path, "analytic_nll_full", [dict(sampler="ddpm", nll_steps=1000, nll_bpd=3.6, nll_bpd_se=0.01)])
    _, _, measured, verdict = table.row_analytic_nll(tmp_path)
    assert "matched at K = 10 (100x fewer steps)" in measured and verdict.startswith("reproduced")
    # convergence: a significant gain on the converged model only
    sweep(tmp_path / "early", "skip_dpmpp", skip_rows({10: 1.0}))
    sweep(tmp_path / "conv", "skip_dpmpp", skip_rows({10: 0.7}))
    _, _, measured, verdict = table.row_convergence(tmp_path / "conv", tmp_path / "early")
    assert verdict.startswith("reproduced") and "early 1 (no significant gain), converged 0.7" in measured


def sweep_commands():
    """The run.py commands experiments/claims/sweeps.sh would run (DRY=1), each as its list of overrides."""
    import os
    import shlex
    import subprocess

    out = subprocess.run(["bash", str(ROOT / "experiments/claims/sweeps.sh")], capture_output=True, text=True, check=True,
                         env=dict(os.environ, DRY="1", MODEL="checkpoints/fashion_mnist/unet", TAG="t")).stdout
    return [shlex.split(line)[1:] for line in out.splitlines() if line.startswith("run.py")]


def split_sweep(value: str) -> list:
    """A Hydra sweep value a,b,c -> [a, b, c]; a list [a,b] or an interpolation stays whole."""
    if value.startswith("[") or "${" in value:
        return [value]
    return value.split(",")


def test_every_claims_sweep_composes_and_validates():
    """Each job of the claims sweeps (the first and last value of every swept option) is a config run.py
    accepts: no key the YAML lacks, no value the validators refuse. Paths made by earlier sweeps are left out."""
    import itertools

    from conftest import compose_cfg
    from fewstep.tasks import SAMPLING_TASKS, validate

    commands = sweep_commands()
    assert len(commands) >= 30 and all(c[0] in ("-m", "task=gamma") for c in commands)
    n = 0
    for args in commands:
        args = [a for a in args if a != "-m" and not a.startswith(("hydra.", "metrics.paired_with=", "resume="))]
        choices = []
        for a in args:
            key, _, value = a.partition("=")
            values = split_sweep(value)
            choices.append([f"{key}={v}" for v in dict.fromkeys([values[0], values[-1]])])
        for overrides in itertools.product(*choices):
            cfg = compose_cfg(list(overrides) + ["logger=none"])
            if cfg.task.name in SAMPLING_TASKS:
                validate(cfg)
            n += 1
    assert n >= 60
