"""metrics.json says what made the result: the weights, the reference statistics and the Gamma file."""
from __future__ import annotations

import json

from conftest import REPO, TINY_OVERRIDES, compose_cfg

SHIPPED = REPO / "checkpoints" / "fashion_mnist"


def run_here(tmp_path, monkeypatch, overrides):
    from fewstep.tasks import dispatch

    monkeypatch.chdir(tmp_path)
    dispatch(compose_cfg([*overrides, "logger=none"]))
    return json.loads((tmp_path / "metrics.json").read_text())


def test_metrics_json_names_the_weights_statistics_and_gamma(tmp_path, monkeypatch):
    from fewstep.metrics.classifier import file_digest
    from fewstep.strategies.variance import find_gamma

    m = run_here(tmp_path, monkeypatch, ["sampler=ddpm", "sampler.steps=3", "variance=analytic", "n_samples=10"])
    ref = SHIPPED / "ref_stats" / "fashion_mnist-train-classifier-all.npz"
    assert m["weights"] == str(SHIPPED / "unet")
    assert m["ref_stats"] == str(ref) and m["ref_stats_sha256"] == file_digest(ref)
    # the file variance=analytic's own finder picks (the folder holds M1000 and M512: the largest M wins)
    gamma = find_gamma(m["model_id"], [SHIPPED / "unet"], "fashion_mnist")
    assert gamma.name.endswith("_M1000.safetensors")
    assert m["gamma"] == str(gamma) and m["gamma_sha256"] == file_digest(gamma)


def test_random_weights_are_said_in_one_warning_and_in_metrics_json(tmp_path, monkeypatch, capsys):
    m = run_here(tmp_path, monkeypatch, [*TINY_OVERRIDES, "sampler.steps=2", "n_samples=4"])
    assert m["weights"].startswith("random")
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fewstep: warning:")]
    assert warnings == ["fewstep: warning: backbone=unet has no backbone.pretrained: sampling a randomly "
                        "initialised network"]


def test_metrics_json_is_strict_json(tmp_path):
    """A metric that could not be computed (nan) or overflowed (inf) is null, never a bare NaN token."""
    import numpy as np

    from fewstep.outputs import write_json_atomic

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    path = write_json_atomic(tmp_path / "m.json", {"fid": float("nan"), "x": [1.5, float("inf")], "n": np.int64(3),
                                                   "s": np.float32(2.5), "name": "a"})
    assert '"n": 3,' in path.read_text()
    assert json.loads(path.read_text(), parse_constant=refuse) == {"fid": None, "x": [1.5, None], "n": 3, "s": 2.5,
                                                                   "name": "a"}
