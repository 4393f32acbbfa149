"""`python run.py` with no arguments: the shipped Fashion-MNIST model, DPM-Solver++ 10 NFE, classifier FID."""
import json

from test_run import run_py


def test_default_run_reports_every_metric(tmp_path):
    out = tmp_path / "default"
    p = run_py("n_samples=100", "batch_size=100", "logger=none", f"hydra.run.dir={out}")
    m = json.loads((out / "metrics.json").read_text())
    for key in ("nfe", "macs_per_sample", "wall_time_s", "images_per_s", "fid", "precision", "recall",
                "inception_score", "classifier_test_accuracy"):
        assert key in m, key
    assert m["nfe"] == 10 and m["sampler"] == "dpmpp" and m["n_samples"] == 100
    assert 1e8 < m["macs_per_sample"] < 1e11
    # the shipped model makes clothes, not noise: far below the FID of random images (~500 here)
    assert 0 < m["fid"] < 200 and m["precision"] > 0.3
    assert (out / "samples.png").exists()
    assert "fid" in p.stdout  # the short table
