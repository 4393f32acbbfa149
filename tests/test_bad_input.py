"""Every user error ends as one line `fewstep: error: ...` and exit 2, before sampling, and leaves no metrics.json.

One parametrized list of the bad inputs the project knows of: those the config alone decides are refused
before any model is built; the rest (they need the network: a cache branch it lacks, a rho file of another
model, a corrupt checkpoint) before the first network call.
"""
from __future__ import annotations

import shutil

import pytest
import yaml

from conftest import REPO, assert_one_line_error, compose_cfg

SHIPPED = REPO / "checkpoints" / "fashion_mnist"
SHIPPED_SKIPS = 9


def rho_file(path, **fields):
    data = {"rho": [0.9] * SHIPPED_SKIPS, "t": None, "num_skips": SHIPPED_SKIPS, "model_id": "0123456789abcdef"}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not ...}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def corrupt_checkpoint(tmp):
    bad = tmp / "bad_unet"
    shutil.copytree(SHIPPED / "unet", bad, ignore=shutil.ignore_patterns("gamma_*"))
    w = bad / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])          # a truncated download
    return str(bad)


def renamed_ref_stats(tmp):
    d = tmp / "ref"
    d.mkdir()
    shutil.copy(SHIPPED / "ref_stats" / "fashion_mnist-train-classifier-all.npz", d / "mnist5k-train-classifier-all.npz")
    return [f"metrics.ref_stats_dir={d}", f"metrics.classifier_dir={SHIPPED / 'classifier'}", "dataset=mnist5k"]


def renamed_split_stats(tmp):
    d = tmp / "ref"
    d.mkdir()
    shutil.copy(SHIPPED / "ref_stats" / "fashion_mnist-train-classifier-all.npz", d / "fashion_mnist-test-classifier-all.npz")
    return [f"metrics.ref_stats_dir={d}", "metrics.ref_split=test"]


def paired_base(tmp, rows=20, seed=0, ref=SHIPPED / "ref_stats" / "fashion_mnist-train-classifier-all.npz"):
    """A base run folder for metrics.paired_with: features.npz with `rows` rows scored against `ref`, its config
    with `seed`."""
    import numpy as np

    d = tmp / f"base_{rows}_{seed}"
    (d / ".hydra").mkdir(parents=True)
    np.savez(d / "features.npz", features=np.zeros((rows, 128), np.float32), ref_stats=np.array(str(ref)),
             fid=np.float64(1))
    (d / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
    return [f"metrics.paired_with={d}"]


def crafted_ref_stats(tmp, craft):
    """A metrics.ref_stats_dir whose file for fashion_mnist's train split is `craft(shipped file, its path)`."""
    src = SHIPPED / "ref_stats" / "fashion_mnist-train-classifier-all.npz"
    d = tmp / "ref"
    d.mkdir()
    craft(src, d / src.name)
    return [f"metrics.ref_stats_dir={d}"]


def without_meta(src, dst):
    """The arrays RefStats.save writes, all but its json `meta`."""
    import numpy as np

    with np.load(src, allow_pickle=False) as z:
        np.savez_compressed(dst, **{k: z[k] for k in z.files if k != "meta"})


def truncated(src, dst):
    dst.write_bytes(src.read_bytes()[:1000])          # a cut-off copy: no zip directory


def nan_in_mu(src, dst):
    from fewstep.metrics.fid import RefStats

    ref = RefStats.load(src)
    ref.mu[5] = float("nan")
    ref.save(dst)


def crafted_gamma(tmp, value):
    """The shipped model's Gamma file, written as save_gamma writes it, with `value` at one timestep; sampled by
    ddpm with variance=analytic."""
    from fewstep.safe_io import load_tensors, save_tensors
    from fewstep.strategies.variance.gamma import GAMMA_KIND

    src = SHIPPED / "unet" / "gamma_1c51947559dab976_fashion_mnist_M1000.safetensors"
    tensors, meta = load_tensors(src, GAMMA_KIND)
    tensors["gamma"][10] = value
    save_tensors(tmp / src.name, tensors, GAMMA_KIND, meta)
    return ["sampler=ddpm", "variance=analytic", f"variance.gamma_path={tmp / src.name}"]


# (id, overrides (a callable of tmp_path for files), words the one line must contain, decided by the config alone)
CASES = [
    ("cache_branch", lambda t: ["cache=deepcache", "cache.branch=9"], "cache.branch must be in 0..8", False),
    ("steps_above_N", lambda t: ["sampler.steps=2000"], "sampler.steps must be <= the 1000", True),
    ("negative_seed", lambda t: ["seed=-1"], "seed must be an integer", True),
    ("learned_without_path", lambda t: ["skip=learned"], "skip=learned needs skip.path", True),
    ("unknown_feature", lambda t: ["metrics.feature=foo"], "unknown metrics.feature 'foo'", True),
    ("rho_of_another_model", lambda t: ["skip=learned", f"skip.path={rho_file(t / 'r.yaml')}"],
     "was learned for model 0123456789abcdef", False),
    ("rho_without_model_id", lambda t: ["skip=learned", f"skip.path={rho_file(t / 'r.yaml', model_id=...)}"],
     "names no model_id", False),
    ("rho_with_inf", lambda t: ["skip=learned", f"skip.path={rho_file(t / 'r.yaml', rho=[float('inf')] * 9)}"],
     "finite", True),
    ("corrupt_checkpoint", lambda t: [f"backbone.pretrained={corrupt_checkpoint(t)}"], "not a loadable UNet2DModel",
     False),
    ("too_few_samples_for_metrics", lambda t: ["n_samples=8"], "n_samples=8 is too few for metrics=default", True),
    ("fractional_n_samples", lambda t: ["n_samples=1.5"], "n_samples must be an integer >= 1 (got 1.5)", True),
    ("fractional_batch_size", lambda t: ["batch_size=1.5"], "batch_size must be an integer >= 1 (got 1.5)", True),
    ("whole_float_n_samples", lambda t: ["n_samples=20.0"], "n_samples must be an integer", True),
    ("infinite_eta", lambda t: ["sampler=ddim", "sampler.eta=inf"], "sampler.eta must be a finite number", True),
    ("nan_rho", lambda t: ["skip.rho_bottom=nan"], "skip.rho_bottom must be a finite number", True),
    *[(f"analytic_with_{s}", lambda t, s=s: [f"sampler={s}", "variance=analytic"],
       f"sets the reverse variance of ddpm and ddim; sampler={s} has none to set", True)
      for s in ("dpmpp", "euler", "heun", "diffusers")],
    ("gamma_with_nan", lambda t: crafted_gamma(t, float("nan")), "holds non-finite Gamma values", False),
    ("gamma_with_inf", lambda t: crafted_gamma(t, float("inf")), "holds non-finite Gamma values", False),
    ("ref_stats_of_another_dataset", renamed_ref_stats, "are of dataset 'fashion_mnist', this run needs 'mnist5k'",
     False),
    ("ref_stats_of_another_split", renamed_split_stats, "are of split 'train', this run needs 'test'", False),
    ("ref_stats_without_meta", lambda t: crafted_ref_stats(t, without_meta),
     "cannot be read (KeyError: 'meta is not a file in the archive')", False),
    ("ref_stats_truncated", lambda t: crafted_ref_stats(t, truncated), "cannot be read (BadZipFile", False),
    ("ref_stats_task_on_a_truncated_file", lambda t: ["task=ref_stats", *crafted_ref_stats(t, truncated)],
     "cannot be read (BadZipFile: File is not a zip file): recompute it with task=ref_stats task.force=true", False),
    ("ref_stats_with_nan", lambda t: crafted_ref_stats(t, nan_in_mu), "hold non-finite numbers (inf or nan) in mu",
     False),
    ("train_infinite_lr", lambda t: ["task=train", "task.lr=inf"], "task.lr must be a finite number", True),
    ("train_fractional_batch_size", lambda t: ["task=train", "task.batch_size=1.5", "task.max_steps=1"],
     "task.batch_size must be an integer >= 1 (got 1.5)", True),   # one step: a regression fails fast
    ("gamma_negative_seed", lambda t: ["task=gamma", "seed=-1"], "seed must be an integer", True),
    ("gamma_fractional_timesteps", lambda t: ["task=gamma", "task.timesteps=2.5"],
     "task.timesteps must be 'all', a stride k >= 1 or a list of integers in [0, 999] (got 2.5)", True),
    ("image_metrics_on_gmm", lambda t: ["dataset=gmm", "backbone=gmm_exact", "metrics=classifier"],
     "dataset=gmm takes metrics=gmm", True),
    ("denoise_loss_timestep_above_N", lambda t: ["task=denoise_loss", "task.timesteps=[100,1000]"],
     "task.timesteps must be a list of integer timesteps in 0..999", True),
    ("denoise_loss_without_features", lambda t: ["task=denoise_loss", "metrics=cost"],
     "task=denoise_loss needs a feature network", True),
    ("denoise_loss_with_a_cache", lambda t: ["task=denoise_loss", "cache=deepcache"],
     "task=denoise_loss measures single network calls", True),
    ("paired_with_no_features", lambda t: [f"metrics.paired_with={t}"], "no features.npz there", True),
    ("paired_with_other_sample_count", lambda t: paired_base(t, rows=7), "holds 7 samples, this run makes 20", True),
    ("paired_with_other_seed", lambda t: paired_base(t, seed=5), "the base run used seed=5", True),
    ("paired_with_other_ref_stats", lambda t: paired_base(t, ref=t / "other.npz"), "need the same reference statistics",
     True),
    ("diverging_samples", lambda t: ["skip.rho_bottom=1e30", "n_samples=10"],
     "network output of network call 1 (t = 999) is not finite", False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys, request):
    _, overrides, words, config_alone = case
    if config_alone:
        request.getfixturevalue("no_model_building")
    cfg = compose_cfg([*overrides(tmp_path), "logger=none", "n_samples=20", "sampler.steps=3"][::-1])
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    assert_one_line_error(cfg, out, capsys, words, sampling_started=case[0] == "diverging_samples")


def test_gmm_with_the_default_metrics_runs(tmp_path, monkeypatch):
    """dataset=gmm backbone=gmm_exact alone: metrics=default means the dataset's own checks (no classifier)."""
    from fewstep.tasks import dispatch

    monkeypatch.chdir(tmp_path)
    result = dispatch(compose_cfg(["dataset=gmm", "backbone=gmm_exact", "logger=none", "n_samples=200",
                                   "batch_size=200", "sampler.steps=10"]))
    assert "fid" not in result and result["cov_err"] < 1 and (tmp_path / "metrics.json").exists()


def test_a_message_of_several_lines_is_cut_to_its_first(tmp_path, monkeypatch, capsys):
    """An error whose text has several lines (an exception's message) still prints one line: its first."""
    import fewstep.tasks.evaluate
    from fewstep.config import ConfigError

    def run(cfg):
        raise ConfigError("the first line\nthe second line")

    monkeypatch.setattr(fewstep.tasks.evaluate, "run", run)
    cfg = compose_cfg(["logger=none", "metrics=cost"])
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cfg, tmp_path, capsys, "fewstep: error: the first line")


@pytest.mark.parametrize("grid,words", [
    (["sampler.steps=2"], "the sample entering network call 2 (t = 0) is not finite"),
    (["sampler.steps=1", "sampler.endpoint=false"],
     "the final sample (the last step of sampler=dpmpp, after 1 network calls) is not finite"),
])
def test_a_sampler_step_that_overflows_stops_the_run(grid, words, tmp_path, monkeypatch, capsys):
    """A finite network output (3e38, near float32's largest number) that the sampler's step makes inf: its data
    prediction x0 = (x - sigma eps) / alpha overflows at t = 999 (alpha ~ 0.006). On the grid (999, 0) the inf
    sample enters network call 2 (the denoiser's input check names it); on the grid (999) DPM-Solver++ returns
    that x0, the final sample (evaluate's check). Either way one line, exit 2, no metrics.json."""
    import torch

    import fewstep.tasks.evaluate as ev

    build = ev.build_denoiser

    def overflowing(cfg, device):
        model = build(cfg, device)
        call = model.backbone_out
        monkeypatch.setattr(model, "backbone_out", lambda *a, **k: torch.full_like(call(*a, **k), 3e38))
        return model

    monkeypatch.setattr(ev, "build_denoiser", overflowing)
    cfg = compose_cfg(["logger=none", "metrics=cost", "n_samples=2", "batch_size=2", *grid])
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cfg, tmp_path, capsys, words, sampling_started=True)
