"""Nothing loaded from a path runs code: Gamma files, Gamma partials, teacher caches and CIFAR-10 batches.

Each place gets a crafted pickle whose unpickling would create a marker file (an `open(marker, "w")` call
in __reduce__), put where the code looks for it: it must be refused with a one-line ConfigError and the
marker must not exist. The formats written now (safetensors + JSON metadata) round-trip exactly.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY_OVERRIDES, compose_cfg
from fewstep.config import ConfigError
from fewstep.safe_io import UnsafeFile, load_tensors, save_tensors
from fewstep.strategies.variance import (GammaStats, build_variance, estimate_gamma, find_gamma, gamma_filename,
                                         load_gamma, model_id, save_gamma)

SHIPPED = REPO / "checkpoints" / "fashion_mnist" / "unet"
SHIPPED_GAMMA = SHIPPED / "gamma_1c51947559dab976_fashion_mnist_M1000.safetensors"


class Evil:
    """Unpickling this calls open(marker, "w"): the file appearing means the loader ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Call:
    """Unpickling this calls fn(*args)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def torch_pickle(path: Path, marker: Path, obj=None) -> Path:
    """A malicious file in the earlier torch.save format (zip archive holding a pickle)."""
    torch.save(Evil(marker) if obj is None else obj, path)
    return path


def raw_pickle(path: Path, obj, protocol: int = 2) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def test_crafted_files_do_run_code_when_unpickled(tmp_path):
    """Control: the crafted files are real exploits (so the refusals below are not vacuous)."""
    marker = tmp_path / "ran"
    torch.load(torch_pickle(tmp_path / "a.pt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    with open(raw_pickle(tmp_path / "b.pkl", {b"data": Evil(marker)}), "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists()


def test_safe_io_round_trip_and_refusals(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "i": torch.arange(5),
               "state": g.get_state()}
    meta = {"key": {"model_id": "m", "timesteps": [0, 5], "seed": 1}, "count": 7, "note": None, "flag": True}
    path = save_tensors(tmp_path / "x.safetensors", tensors, "thing", meta)
    back, m = load_tensors(path, "thing")
    assert m == meta and set(back) == set(tensors)
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(UnsafeFile, match="is not a fewstep other file .*metadata says 'thing'"):
        load_tensors(path, "other")
    marker = tmp_path / "ran"
    for bad in (torch_pickle(tmp_path / "t.pt", marker), raw_pickle(tmp_path / "r.pkl", Evil(marker))):
        with pytest.raises(UnsafeFile, match="is a pickle .*does not load because unpickling can run code: redo"):
            load_tensors(bad, "thing", "redo")
    (tmp_path / "junk").write_bytes(b"not a tensor file")
    with pytest.raises(UnsafeFile, match="junk is not a fewstep thing file"):
        load_tensors(tmp_path / "junk", "thing")
    assert not marker.exists()
    assert issubclass(UnsafeFile, ConfigError)           # dispatch prints it as one line, exit code 2


# ---------------------------------------------------------------------------- Gamma files
from test_variance import variance_cfg  # noqa: E402  (the variance config of the Gamma-file tests)


def test_gamma_file_round_trip(model, mixture, schedule, tmp_path):
    mid = model_id(model.backbone)
    st = estimate_gamma(model, [mixture.sample(32, torch.Generator().manual_seed(1))], schedule, [0, 400, 999])
    path = save_gamma(tmp_path / gamma_filename(mid, "gmm", st.count), st, model_id=mid, dataset="gmm",
                      schedule=schedule, pretrained="some/folder", split="train", skip_active=False)
    assert path.suffix == ".safetensors"
    g = load_gamma(path, mid, schedule)
    assert g["timesteps"].tolist() == [0, 400, 999] and g["timesteps"].dtype == torch.int64
    assert torch.equal(g["gamma"], torch.as_tensor(st.gamma)) and torch.equal(g["stderr"], torch.as_tensor(st.stderr))
    assert (g["model_id"], g["dataset"], g["M"], g["N"], g["pretrained"], g["split"], g["skip_active"], g["format"]) \
        == (mid, "gmm", 32, 1000, "some/folder", "train", False, 2)
    back = GammaStats.from_state_dict(g["stats"])
    assert np.array_equal(back.sum, st.sum) and np.array_equal(back.sumsq, st.sumsq) and back.count == st.count


def test_legacy_or_crafted_gamma_file_is_refused(model, schedule, tmp_path):
    mid = model_id(model.backbone)
    marker = tmp_path / "ran"
    folder = tmp_path / "downloaded_model"
    folder.mkdir()
    legacy = torch_pickle(folder / f"gamma_{mid}_gmm_M64.pt", marker)
    # found automatically in a searched folder (the pretrained folder of a downloaded model)
    assert find_gamma(mid, [folder], "gmm") == legacy
    with pytest.raises(UnsafeFile, match=r"gamma_.*_M64\.pt is a pickle .*can run code: re-estimate it with "
                                         r"`python run.py task=gamma dataset=gmm backbone=gmm_exact`"):
        build_variance(variance_cfg(search_dirs=[str(folder)]), schedule, mid)
    # named explicitly, under either suffix
    disguised = raw_pickle(folder / gamma_filename(mid, "gmm", 64), Evil(marker))
    for p in (legacy, disguised):
        with pytest.raises(UnsafeFile, match="is a pickle"):
            build_variance(variance_cfg(gamma_path=str(p)), schedule, mid)
    assert not marker.exists()
    # a safetensors Gamma anywhere in the search path wins over a legacy file in an earlier folder
    disguised.unlink()
    good = tmp_path / "cache"
    st = GammaStats([0, 999], np.array([1.0, 2.0]), np.array([1.0, 4.0]), 2)
    path = save_gamma(good / gamma_filename(mid, "gmm", 2), st, model_id=mid, dataset="gmm", schedule=schedule)
    assert build_variance(variance_cfg(search_dirs=[str(folder), str(good)]), schedule, mid).path == str(path)
    assert not marker.exists()


def test_shipped_gamma_is_safetensors_and_belongs_to_the_shipped_model():
    from fewstep.build import load_pretrained
    from fewstep.schedule import NoiseSchedule

    assert SHIPPED_GAMMA.exists() and not list(SHIPPED.glob("gamma_*.pt"))
    unet = load_pretrained(str(SHIPPED))
    g = load_gamma(SHIPPED_GAMMA, model_id(unet), NoiseSchedule.from_config("linear", 1000))
    assert g["M"] == 1000 and len(g["gamma"]) == 51 and g["timesteps"][:3].tolist() == [0, 20, 40]
    assert g["stats"]["count"] == 1000 and np.allclose(GammaStats.from_state_dict(g["stats"]).gamma, g["gamma"].numpy())
    assert find_gamma(model_id(unet), [SHIPPED], "fashion_mnist") == SHIPPED_GAMMA


def test_cli_refuses_a_pickled_gamma_in_the_pretrained_folder(tmp_path, monkeypatch, capsys):
    """python run.py sampler=ddpm variance=analytic backbone.pretrained=<folder>: one line, exit 2, nothing ran."""
    from fewstep.tasks import dispatch

    folder = tmp_path / "downloaded"
    folder.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (folder / name).symlink_to(SHIPPED / name)
    marker = tmp_path / "ran"
    torch_pickle(folder / SHIPPED_GAMMA.with_suffix(".pt").name, marker)   # the name find_gamma looks for
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(["sampler=ddpm", "variance=analytic", f"backbone.pretrained={folder}", "device=cpu",
                       "logger=none", "metrics=cost", "n_samples=2", "batch_size=2"])
    with pytest.raises(SystemExit) as e:
        dispatch(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fewstep: error: ") and "is a pickle" in err[0], err
    assert "re-estimate it with `python run.py task=gamma" in err[0]
    assert not marker.exists()


# ---------------------------------------------------------------------------- task=gamma partial files

def test_gamma_partial_refused_and_round_trip(model, mixture, schedule, tmp_path, capsys):
    from fewstep.tasks.gamma import PARTIAL_KIND, estimate_to_file

    x0 = mixture.sample(48, torch.Generator().manual_seed(2))
    kw = dict(mid="m", dataset="gmm", timesteps=[0, 500, 999], batch_size=16, seed=3, progress=False)
    marker = tmp_path / "ran"
    path = tmp_path / "a" / "g.safetensors"
    path.parent.mkdir()
    partial = path.with_name(path.name + ".partial0of1")
    torch_pickle(partial, marker)
    with pytest.raises(UnsafeFile, match=r"partial0of1 is a pickle .*: delete it and rerun"):
        estimate_to_file(model, x0, schedule, path, **kw)
    raw_pickle(partial, Evil(marker))
    with pytest.raises(UnsafeFile, match="is a pickle"):
        estimate_to_file(model, x0, schedule, path, **kw)
    assert not marker.exists() and not path.exists()

    # the partial written now: sums, count and generator state; resuming from it is exact
    partial.unlink()
    assert estimate_to_file(model, x0, schedule, path, max_batches=1, **kw) is None
    st, meta = load_tensors(partial, PARTIAL_KIND)
    assert meta["count"] == 16 and meta["key"]["timesteps"] == [0, 500, 999] and meta["key"]["model_id"] == "m"
    assert st["sum"].dtype == torch.float64 and st["sum"].shape == (3,) and st["generator"].dtype == torch.uint8
    resumed = estimate_to_file(model, x0, schedule, path, **kw)
    full = estimate_to_file(model, x0, schedule, tmp_path / "b" / "g.safetensors", **kw)
    assert torch.equal(resumed["gamma"], full["gamma"]) and torch.equal(resumed["stderr"], full["stderr"])

    # a partial of the earlier format at its old name is not read: the estimate starts over
    legacy = tmp_path / "c" / "g.pt.partial0of1"
    legacy.parent.mkdir()
    torch_pickle(legacy, marker)
    capsys.readouterr()
    g = estimate_to_file(model, x0, schedule, legacy.parent / "g.safetensors", **{**kw, "progress": True})
    assert "not reading" in capsys.readouterr().out and torch.equal(g["gamma"], full["gamma"])
    assert not marker.exists()


# ---------------------------------------------------------------------------- task=tune_rho teacher cache

def test_teacher_cache_refused_and_round_trip(tmp_path, monkeypatch, capsys):
    import fewstep.tasks.tune_rho as tr
    from fewstep.build import build_denoiser, sample_shape

    cfg = compose_cfg(TINY_OVERRIDES + ["task=tune_rho", "sampler=dpmpp", "sampler.steps=3", "task.teacher_steps=6",
                                        "task.batch_size=4", f"task.cache_dir={tmp_path / 'teacher'}", "logger=none"])
    torch.manual_seed(0)
    model = build_denoiser(cfg, torch.device("cpu"))
    mid, shape, idx = model_id(model.backbone), sample_shape(cfg), np.arange(4)
    x0 = tr.teacher_x0(cfg, model, idx, shape, torch.device("cpu"), mid)
    (cache,) = (tmp_path / "teacher").glob(f"teacher_{mid}_dpmpp6_s*_n4_*.safetensors")
    blob, meta = load_tensors(cache, tr.TEACHER_KIND)
    assert torch.equal(blob["x0"], x0) and meta["key"]["model_id"] == mid and meta["key"]["n"] == 4

    def no_sampling(*a, **k):
        raise AssertionError("the teacher was recomputed")

    real = tr.sample
    monkeypatch.setattr(tr, "sample", no_sampling)
    assert torch.equal(tr.teacher_x0(cfg, model, idx, shape, torch.device("cpu"), mid), x0)    # from the cache

    marker = tmp_path / "ran"
    torch_pickle(cache, marker)                   # the predictable file name, overwritten by an attacker
    with pytest.raises(UnsafeFile, match=r"teacher_.*\.safetensors is a pickle .*: delete it"):
        tr.teacher_x0(cfg, model, idx, shape, torch.device("cpu"), mid)
    assert not marker.exists()

    # a cache of the earlier format at its old name is not read: recomputed (and written safely)
    cache.unlink()
    legacy = torch_pickle(cache.with_suffix(".pt"), marker)
    monkeypatch.setattr(tr, "sample", real)
    capsys.readouterr()
    assert torch.equal(tr.teacher_x0(cfg, model, idx, shape, torch.device("cpu"), mid), x0)
    assert f"not reading {legacy}" in capsys.readouterr().out and cache.exists() and not marker.exists()


def test_training_resume_refuses_a_crafted_checkpoint(tmp_path, monkeypatch, capsys):
    """task=train resumes from <run_dir>/ckpts/last.ckpt: a crafted pickle there is refused in one line, exit
    2, before any model or data is built, and its payload never runs (a genuine checkpoint resumes:
    test_train::test_train_task_exports_a_loadable_model_and_resumes)."""
    from conftest import assert_one_line_error

    run = tmp_path / "run"
    (run / "ckpts").mkdir(parents=True)
    marker = tmp_path / "ran"
    torch_pickle(run / "ckpts" / "last.ckpt", marker)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    cfg = compose_cfg(TINY_OVERRIDES + ["task=train", f"task.run_dir={run}", "task.max_steps=1", "logger=none"])
    assert_one_line_error(cfg, out, capsys, "is not a plain checkpoint")
    assert not marker.exists()


# ---------------------------------------------------------------------------- CIFAR-10 batches

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def cifar_batch(images, labels) -> dict:
    return {b"batch_label": b"synthetic", b"labels": list(labels), b"data": images.reshape(len(images), -1),
            b"filenames": [b"x.png"] * len(images)}


def test_cifar10_restricted_unpickler(tmp_path, monkeypatch, capsys):
    from fewstep.data import load_dataset
    from fewstep.data.datasets import DatasetRefused, DataUnpickler

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8) for _ in CIFAR_TRAIN]
    for name, im in zip(CIFAR_TRAIN, imgs):
        raw_pickle(root / name, cifar_batch(im, [1, 2]))
    # the real files were written by numpy 1 (numpy.core.multiarray): rename the module in one batch
    one = root / CIFAR_TRAIN[0]
    one.write_bytes(one.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    c = OmegaConf.load(REPO / "conf" / "dataset" / "cifar10.yaml")
    c.root = str(root)
    x = load_dataset(c, "train")
    assert torch.equal(x, torch.from_numpy(np.concatenate(imgs)).float() / 127.5 - 1)

    marker = tmp_path / "ran"
    for evil in (cifar_batch(imgs[0], [Evil(marker)]), {b"data": Evil(marker), b"labels": [0]}, Evil(marker)):
        for protocol in (2, 4):
            raw_pickle(root / CIFAR_TRAIN[2], evil, protocol)
            with pytest.raises(DatasetRefused, match=r"data_batch_3 names (io|builtins|__builtin__)\.open, which a data "
                                                     r"file does not need: refusing to load it"):
                load_dataset(c, "train")
    for name in ("posix.system", "numpy.load", "torch.load", "numpy.core.multiarray.scalar"):
        module, _, attr = name.rpartition(".")
        with open(root / CIFAR_TRAIN[0], "rb") as fh, pytest.raises(DatasetRefused, match=f"names {module}.{attr}"):
            DataUnpickler(fh).find_class(module, attr)
    assert not marker.exists()
    raw_pickle(root / CIFAR_TRAIN[2], Call(codecs.encode, ("x", "rot13")))    # only latin1 bytes, as Python 3 writes
    with pytest.raises(DatasetRefused, match=r"calls _codecs.encode\(str, 'rot13'\)"):
        load_dataset(c, "train")
    raw_pickle(root / CIFAR_TRAIN[2], [1, 2, 3])
    with pytest.raises(DatasetRefused, match="is not a CIFAR-10 python batch"):
        load_dataset(c, "train")

    # through the command line: one line, exit code 2 (before any model is built)
    from fewstep.tasks import dispatch

    raw_pickle(root / CIFAR_TRAIN[2], Evil(marker))
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(TINY_OVERRIDES + ["task=gamma", "dataset=cifar10", f"dataset.root={root}", "task.M=4",
                                        "device=cpu", "logger=none"])
    with pytest.raises(SystemExit) as e:
        dispatch(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("fewstep: error: ") and "open" in err[0], err
    assert not marker.exists()
