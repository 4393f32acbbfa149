"""task=denoise_loss: pixel and feature denoising losses of single calls, plain vs a skip strategy, paired."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from fewstep.data.datasets import FASHION_MNIST_ROOT

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(),
                                reason="needs the Fashion-MNIST test split (make data)")


def run_task(tmp_path, *overrides, timesteps="[500,100]"):
    from fewstep.tasks import denoise_loss

    cfg = compose_cfg(["task=denoise_loss", "task.n_images=6", f"task.timesteps={timesteps}", "logger=none", *overrides])
    out = tmp_path / "_".join([o.replace("/", "_") for o in overrides] + [timesteps.strip("[]").replace(",", "_")])
    out.mkdir()
    result = denoise_loss.run(cfg, out_dir=str(out))
    with open(out / "denoise_loss.csv") as f:
        rows = list(csv.DictReader(f))
    return cfg, result, rows, out


def test_losses_are_the_definitions_on_the_same_images_and_noise(tmp_path):
    from fewstep.build import build_denoiser
    from fewstep.data.datasets import load_dataset
    from fewstep.metrics.features import build_feature
    from fewstep.samplers.noise import SampleNoise

    cfg, result, rows, out = run_task(tmp_path, "skip.rho_bottom=0.5", "task.batch_size=4")
    assert [(r["variant"], int(r["t"])) for r in rows] == [("plain", 100), ("plain", 500), ("linear", 100),
                                                          ("linear", 500)]
    assert result["variants"] == ["plain", "linear"] and (out / "denoise_loss.png").stat().st_size > 1000
    # recompute by hand: the seeded subset, and each image's noise at t from its stream (seed, i, t)
    x, y = load_dataset(cfg.dataset, split="test", with_labels=True)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:6].sort().values
    x0 = x[idx]
    model, feature = build_denoiser(cfg), build_feature(cfg.metrics)
    strategy = list(model.backbone.skip_hooks)
    assert strategy
    want = {}
    with torch.no_grad():
        for t in (100, 500):
            eps = SampleNoise(0, idx.tolist(), x0.shape[1:], stream=1 + t)()
            ab = float(model.schedule.alpha_bar_at(t))
            xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
            for variant, hooks in (("plain", []), ("linear", strategy)):
                model.backbone.skip_hooks = hooks
                e = model(xt, float(t))
                x0_hat = (xt - math.sqrt(1 - ab) * e) / math.sqrt(ab)
                f = feature.extract(x0_hat.clamp(-1, 1))[0] - feature.extract(x0)[0]
                want[variant, t] = ((e - eps).pow(2).mean().item(), (x0_hat - x0).pow(2).mean().item(),
                                    f.pow(2).mean().item())
    for r in rows:
        pe, px, fe = want[r["variant"], int(r["t"])]
        assert float(r["pixel_eps"]) == pytest.approx(pe, rel=1e-5)
        assert float(r["pixel_x0"]) == pytest.approx(px, rel=1e-5)
        ab = float(r["ab"])
        assert float(r["pixel_x0"]) == pytest.approx(float(r["pixel_eps"]) * (1 - ab) / ab, rel=1e-5)
        assert float(r["feature"]) == pytest.approx(fe, rel=1e-4)
        if r["variant"] == "linear":   # the paired mean difference is the difference of the means
            p = next(q for q in rows if q["variant"] == "plain" and q["t"] == r["t"])
            for k in ("pixel_eps", "feature"):
                assert float(r[f"d_{k}"]) == pytest.approx(float(r[k]) - float(p[k]), rel=1e-6, abs=1e-12)
                assert float(r[f"d_{k}_se"]) > 0
    # the bands: t = 100 is low (< 250), t = 500 is mid
    lin = {int(r["t"]): r for r in rows if r["variant"] == "linear"}
    assert result["rel_feature/low"] == pytest.approx(float(lin[100]["rel_feature"]))
    assert result["rel_pixel_eps/mid"] == pytest.approx(float(lin[500]["rel_pixel_eps"]))
    assert result["rel_feature/all"] == pytest.approx((float(lin[100]["rel_feature"]) + float(lin[500]["rel_feature"])) / 2)
    assert result["rel_feature/low_se"] == pytest.approx(float(lin[100]["d_feature_se"]) / float(
        next(q for q in rows if q["variant"] == "plain" and q["t"] == "100")["feature"]), rel=1e-6)
    assert "rel_feature/high" not in result            # no t >= 750 was measured
    # neither the batch size nor the other timesteps measured change which image gets which noise
    _, _, rows500, _ = run_task(tmp_path, "skip.rho_bottom=0.5", "task.batch_size=4", timesteps="[500]")
    assert rows500[0]["pixel_eps"] == next(r for r in rows if r["variant"] == "plain" and r["t"] == "500")["pixel_eps"]
    _, again, rows6, _ = run_task(tmp_path, "skip.rho_bottom=0.5", "task.batch_size=6")
    for a, b in zip(rows, rows6):
        assert np.allclose([float(a[k]) for k in ("pixel_eps", "feature")],
                           [float(b[k]) for k in ("pixel_eps", "feature")], rtol=1e-5)


def test_the_plain_network_alone_when_the_strategy_is_trivial(tmp_path):
    _, result, rows, out = run_task(tmp_path, "skip.rho_bottom=1.0")
    assert result["variants"] == ["plain"] and {r["variant"] for r in rows} == {"plain"}
    assert not any(k.startswith("rel_") for k in result) and not (out / "denoise_loss.png").exists()
