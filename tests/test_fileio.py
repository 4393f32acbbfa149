"""One atomic-write helper (fewstep.fileio): every writer goes through a per-process temporary name and a
rename, so concurrent writers never share a temporary file, and nothing is left behind."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from fewstep.fileio import atomic_dir, atomic_path, write_text_atomic


def names(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))


def test_threads_writing_one_path_use_their_own_temporary_names(tmp_path):
    path, n, size = tmp_path / "out.txt", 6, 200_000
    together = threading.Barrier(n)
    tmps, errors = [], []

    def writer(i):
        try:
            with atomic_path(path) as tmp:
                tmps.append(tmp.name)
                tmp.write_text(str(i) * size)
                together.wait(timeout=60)          # all n temporary files are open at once
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(tmps)) == n and all(t != "out.txt.tmp" for t in tmps), (errors, tmps)
    text = path.read_text()
    assert len(text) == size and len(set(text)) == 1        # one writer's whole file, never a mix
    assert names(tmp_path) == ["out.txt"]


def test_two_processes_writing_one_file_never_collide(tmp_path):
    path, go = tmp_path / "shared.txt", tmp_path / "go"
    code = ("import os, sys, time\n"
            "from fewstep.fileio import write_text_atomic\n"
            "path, go, c = sys.argv[1:]\n"
            "while not os.path.exists(go): time.sleep(0.005)\n"
            "end = time.monotonic() + 1.0\n"
            "while time.monotonic() < end: write_text_atomic(path, c * 100000)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(go), c], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for c in "ab"]
    go.write_text("")
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert path.read_text() in ("a" * 100000, "b" * 100000)
    assert names(tmp_path) == ["go", "shared.txt"]


def test_atomic_dir_swaps_a_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp.name != "export.tmp" and not out.exists()
        (tmp / "a").write_text("1")
    assert names(tmp_path) == ["export", "export/a"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
        assert (out / "a").read_text() == "1"               # the old folder stays whole until the swap
    assert names(tmp_path) == ["export", "export/b"]
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "c").write_text("half")
            raise RuntimeError
    assert names(tmp_path) == ["export", "export/b"]


def test_every_writer_leaves_only_its_file(tmp_path):
    from fewstep.metrics.classifier import SmallCNN, save_classifier
    from fewstep.metrics.fid import RefStats
    from fewstep.safe_io import load_tensors, save_tensors
    from fewstep.strategies.skip import load_learned, save_learned_rho
    from fewstep.tasks.skip_norms import write_skip_norms
    from fewstep.tasks.train import export_network
    from fewstep.tasks.tune_rho import plot_rho, write_history

    save_tensors(tmp_path / "t.safetensors", {"x": torch.arange(3)}, "thing", {"k": 1})
    assert load_tensors(tmp_path / "t.safetensors", "thing")[1] == {"k": 1}
    for name in ("rho.yaml", "rho.json"):
        save_learned_rho(tmp_path / name, [0.9, 1.0], meta={"model_id": "m"})
        assert load_learned(tmp_path / name)["rho"] == [pytest.approx(0.9), 1.0]
    rng = np.random.default_rng(0)
    ref = RefStats(mu=rng.normal(size=4), cov=np.eye(4), n=10, pr_features=rng.normal(size=(3, 4)))
    ref.save(tmp_path / "ref.npz")
    assert np.allclose(RefStats.load(tmp_path / "ref.npz").mu, ref.mu)
    save_classifier(SmallCNN(channels=(4,), feature_dim=4), tmp_path / "clf", {"dataset": "x"})
    write_history(tmp_path / "loss.csv", [1.0, 0.5])
    plot_rho(tmp_path / "rho.png", torch.tensor([0.9, 1.0]), [0, 1])
    write_skip_norms([dict(variant="v", step=0, t=999.0, depth=0, level=0, prop=0.5)], str(tmp_path / "norms"))

    class Net:
        def __init__(self, fail=False):
            self.fail = fail

        def save_pretrained(self, folder, safe_serialization=True):
            (Path(folder) / "config.json").write_text("{}")
            if self.fail:
                raise OSError("disk full")

    export_network(Net(), tmp_path / "ema", {"step": 1, "loss": float("nan")})
    with pytest.raises(OSError):
        export_network(Net(fail=True), tmp_path / "ema", {"step": 2})
    assert json.loads((tmp_path / "ema" / "train_state.json").read_text()) == {"step": 1, "loss": None}
    assert names(tmp_path) == ["clf", "clf/config.json", "clf/model.safetensors", "ema", "ema/config.json",
                               "ema/train_state.json", "loss.csv", "norms", "norms/skip_norms.csv",
                               "norms/skip_norms.png", "ref.npz", "rho.json", "rho.png", "rho.yaml", "t.safetensors"]


def test_write_text_atomic_replaces_the_whole_file(tmp_path):
    path = write_text_atomic(tmp_path / "x.txt", "a" * 10)
    write_text_atomic(path, "b")
    assert path.read_text() == "b" and names(tmp_path) == ["x.txt"]
