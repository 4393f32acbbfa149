"""Run folders you can trust: resume by config hash, job folder names, earlier results moved aside, one
process per folder (a lock), per-process temporary files, and a result that no logger failure can lose."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_OVERRIDES, compose_cfg

GMM = ["experiment=gmm_demo", "n_samples=200", "batch_size=200"]


def clean_env(**extra):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HYDRA_FULL_ERROR="0")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_py(*args, env=None, timeout=300, check=True):
    p = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env or clean_env(),
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def lines_with(text: str, word: str):
    return [ln for ln in text.splitlines() if word in ln]


# --------------------------------------------------------------------------- resume
def test_resume_with_the_same_config_skips(tmp_path):
    out = tmp_path / "run"
    run_py(*GMM, "sampler.steps=3", "logger=none", f"hydra.run.dir={out}")
    first = (out / "metrics.json").read_text()
    assert len(json.loads(first)["config_hash"]) == 16
    p = run_py(*GMM, "sampler.steps=3", "logger=none", "resume=true", f"hydra.run.dir={out}")
    assert len(lines_with(p.stdout, "nothing to do")) == 1, p.stdout
    assert (out / "metrics.json").read_text() == first       # not re-run: the wall time would differ
    assert not list(out.glob("metrics.json.prev-*"))


def test_resume_with_a_changed_config_reruns_and_says_why(tmp_path):
    out = tmp_path / "run"
    run_py(*GMM, "sampler.steps=3", "logger=none", f"hydra.run.dir={out}")
    old_hash = metrics(out)["config_hash"]
    p = run_py(*GMM, "sampler.steps=5", "logger=none", "resume=true", f"hydra.run.dir={out}")
    why = lines_with(p.stdout, "resume:")
    assert len(why) == 1 and "re-running" in why[0] and "sampler.steps: 3 -> 5" in why[0], p.stdout
    m = metrics(out)
    assert m["steps"] == 5 and m["nfe"] == 5 and m["config_hash"] != old_hash
    (prev,) = out.glob("metrics.json.prev-*")
    assert json.loads(prev.read_text())["steps"] == 3
    # a metrics.json from before config hashes were kept never counts as done
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if k != "config_hash"}))
    p = run_py(*GMM, "sampler.steps=5", "logger=none", "resume=true", f"hydra.run.dir={out}")
    assert len(lines_with(p.stdout, "has no config_hash")) == 1, p.stdout
    assert metrics(out)["config_hash"] == m["config_hash"]


def test_the_hash_ignores_only_what_cannot_change_a_result():
    from fewstep.outputs import config_hash

    base = config_hash(compose_cfg([*GMM, "sampler.steps=3"]))
    for same in (["resume=true"], ["logger=csv"], ["tags=[a,b]"]):
        assert config_hash(compose_cfg([*GMM, "sampler.steps=3", *same])) == base, same
    for other in (["sampler.steps=4"], ["seed=1"], ["n_samples=201"], ["save_samples=true"]):
        assert config_hash(compose_cfg([*GMM, "sampler.steps=3", *other])) != base, other
    # task=tune_rho: where its rho file and teacher cache go is not what they hold
    tune = ["task=tune_rho", "sampler=dpmpp", "sampler.steps=3"]
    base = config_hash(compose_cfg(tune))
    for same in (["task.out=a/rho.yaml"], ["task.cache_dir=/elsewhere"], ["task.teacher_cache=false"]):
        assert config_hash(compose_cfg([*tune, *same])) == base, same
    for other in (["task.lr=0.02"], ["task.n_train=8"]):
        assert config_hash(compose_cfg([*tune, *other])) != base, other


# --------------------------------------------------------------------------- sweeps
def test_killed_sweep_resumed_gives_one_row_per_job(tmp_path):
    """A sweep killed after job 0 (here: a sweep of job 0 alone) and run again with resume=true skips job 0,
    runs 1 and 2, and its summary has exactly its 3 jobs, whatever else lies in the sweep folder."""
    sweep = tmp_path / "sweep"
    common = [*GMM, "logger=csv", f"hydra.sweep.dir={sweep}"]
    run_py("-m", *common, "sampler.steps=3")
    (job0,) = [d for d in sweep.iterdir() if d.is_dir()]
    first = (job0 / "metrics.json").read_text()
    stale = sweep / "0_resume=true,sampler.steps=3"          # a folder an earlier fewstep named by resume
    stale.mkdir()
    (stale / "metrics.json").write_text(first)
    p = run_py("-m", *common, "sampler.steps=3,5,8", "resume=true")
    assert len(lines_with(p.stdout, "nothing to do")) == 1, p.stdout
    assert (job0 / "metrics.json").read_text() == first
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 3 and sorted(int(r["steps"]) for r in rows) == [3, 5, 8], rows
    assert stale.name not in {r["job"] for r in rows}
    jobs = sorted(d.name for d in sweep.iterdir() if d.is_dir() and d != stale)
    assert len(jobs) == 3
    for name in jobs:   # the experiment names the folder; resume does not
        assert "experiment=gmm_demo" in name and "resume" not in name, name


def test_an_override_with_a_slash_nests_the_job_folder_and_the_summary_finds_it(tmp_path):
    """A value with a `/` (a model folder) nests Hydra's job folder: summary.csv names each job by its path
    below the sweep folder, so its rows lead back to their metrics.json."""
    from fewstep.sweeps import collect_summary

    sweep = tmp_path / "sweep"
    run_py("-m", *GMM, "logger=none", f"hydra.sweep.dir={sweep}", "sampler.steps=3,5", "tags=[runs/a]")
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted(int(r["steps"]) for r in rows) == [3, 5]
    for r in rows:
        assert "/" in r["job"] and (sweep / r["job"] / "metrics.json").is_file(), r["job"]
    assert sorted(r["job"] for r in collect_summary(sweep)) == sorted(r["job"] for r in rows)   # no job list: a walk


def test_job_folder_names_carry_the_experiment_and_not_resume():
    def dirname(*overrides):
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from conftest import CONF

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        return cfg.hydra.job.override_dirname

    a = dirname("experiment=gmm_demo", "sampler.steps=3")
    assert "experiment=gmm_demo" in a
    assert dirname("experiment=analytic_dpm", "sampler.steps=3") != a      # two experiments never share a folder
    assert dirname("experiment=gmm_demo", "sampler.steps=3", "resume=true") == a


# --------------------------------------------------------------------------- earlier results
def test_a_run_moves_earlier_results_aside_before_it_starts(tmp_path, monkeypatch):
    """Even a run that dies right after starting leaves no earlier metrics.json beside its new config."""
    from fewstep.tasks import evaluate

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"steps": 99}))
    (out / "features.npz").write_bytes(b"old")

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_rank", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(compose_cfg([*GMM, "logger=none"]), out=out)
    assert not (out / "metrics.json").exists() and not (out / "features.npz").exists()
    (prev,) = out.glob("metrics.json.prev-*")
    assert json.loads(prev.read_text()) == {"steps": 99}
    assert len(list(out.glob("features.npz.prev-*"))) == 1
    assert not (out / ".fewstep.lock").exists()                # the lock goes with the run


def test_metrics_are_written_before_any_logger_starts(tmp_path, monkeypatch):
    import fewstep.tasks.evaluate as evaluate

    out = tmp_path / "run"
    seen = []

    class Logger:
        def __init__(self, cfg):
            seen.append((out / "metrics.json").exists() and (out / "samples.png").exists())

        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(evaluate, "RunLogger", Logger)
    evaluate.run(compose_cfg([*GMM, "logger=wandb"]), out=out)
    assert seen == [True]


# --------------------------------------------------------------------------- one process per folder
def test_a_second_process_in_the_same_folder_is_refused(tmp_path):
    from fewstep.outputs import RunFolder

    out = tmp_path / "run"
    record = out / ".hydra" / "config.yaml"          # the record of the run that holds the folder
    record.parent.mkdir(parents=True)
    record.write_text("the holder's config\n")
    with RunFolder(out):
        p = run_py(*GMM, "logger=none", f"hydra.run.dir={out}", check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fewstep: error: ") and f"pid {os.getpid()}" in err[0], err
    assert not (out / "metrics.json").exists()
    assert record.read_text() == "the holder's config\n"      # the refused process wrote no .hydra record
    assert sorted(p.name for p in record.parent.iterdir()) == ["config.yaml"]
    # a lock file left by a process that died is no lock: the next run goes ahead
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".fewstep.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    run_py(*GMM, "logger=none", f"hydra.run.dir={out}")
    assert metrics(out)["n_samples"] == 200 and not (out / ".fewstep.lock").exists()
    from omegaconf import OmegaConf                  # the run that went ahead recorded its own job
    assert OmegaConf.load(record).n_samples == 200
    assert "n_samples=200" in OmegaConf.load(out / ".hydra" / "overrides.yaml")
    assert OmegaConf.load(out / ".hydra" / "hydra.yaml").hydra.run.dir == str(out)


def test_temporary_files_are_per_process_and_never_left_behind(tmp_path):
    from fewstep.outputs import atomic_path, write_text_atomic

    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old")
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and str(os.getpid()) in tmp.name and tmp.name != "metrics.json.tmp"
        tmp.write_text("new")
        assert path.read_text() == "old"                       # nothing visible before the rename
    assert path.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# --------------------------------------------------------------------------- logging never costs a result
def no_key_env(tmp_path, **extra):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = dict(HOME=str(home), WANDB_API_KEY=None, NETRC=None, WANDB_IDENTITY_TOKEN_FILE=None, WANDB_BASE_URL=None,
               WANDB_CONFIG_DIR=str(home / ".config" / "wandb"), WANDB_SILENT=None)
    return clean_env(**{**env, **extra})


def test_wandb_online_without_a_key_warns_once_and_keeps_the_result(tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    p = run_py(*GMM, "logger=wandb", f"hydra.run.dir={out}", env=no_key_env(tmp_path, WANDB_MODE="online"),
               timeout=90, check=False)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert time.monotonic() - t0 < 60                          # no waiting on a login or the network
    assert metrics(out)["n_samples"] == 200 and (out / "samples.png").exists()
    warnings = lines_with(p.stdout + p.stderr, "warning")
    assert len(warnings) == 1 and "API key" in warnings[0], (p.stdout[-2000:], p.stderr[-2000:])


def test_wandb_with_a_key_and_no_answering_server_times_out_and_keeps_the_result(tmp_path):
    """A key is configured but the server accepts and never answers (no network): wandb.init gives up after
    logger.init_timeout, the run warns once and exits 0 with its result."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)                                          # connections queue, nothing ever replies
    try:
        out = tmp_path / "run"
        env = no_key_env(tmp_path, WANDB_MODE="online", WANDB_API_KEY="a" * 40,
                         WANDB_BASE_URL=f"http://127.0.0.1:{server.getsockname()[1]}")
        t0 = time.monotonic()
        p = run_py(*GMM, "logger=wandb", "logger.init_timeout=3", f"hydra.run.dir={out}", env=env, timeout=240,
                   check=False)
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert elapsed < 150                                       # not wandb's own 90 s with retries
    assert metrics(out)["n_samples"] == 200 and (out / "samples.png").exists()
    warnings = lines_with(p.stdout + p.stderr, "fewstep: warning")
    assert len(warnings) == 1 and "W&B" in warnings[0] and "Timed out" in warnings[0], (p.stdout[-2000:], p.stderr[-2000:])


def test_a_failing_wandb_is_one_warning_line(tmp_path, monkeypatch, capsys):
    import wandb

    from fewstep.outputs import RunLogger

    def broken(*a, **k):
        raise RuntimeError("network is down\nsecond line")

    monkeypatch.setattr(wandb, "init", broken)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    lg = RunLogger(compose_cfg(["logger=wandb"]))
    lg.log({"x": 1.0})
    lg.finish()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "network is down" in err[0], err


def test_train_honours_logger_mode_disabled(tmp_path):
    run_dir = tmp_path / "train"
    p = run_py("task=train", *TINY_OVERRIDES, "logger=wandb", "logger.mode=disabled", "task.max_steps=1",
               "task.batch_size=8", "task.warmup_steps=1", "task.sample_every=100000", "task.ckpt_every=100000",
               f"task.run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'hydra'}",
               env=no_key_env(tmp_path, WANDB_MODE=None), timeout=240, check=False)
    text = p.stdout + p.stderr
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert "api key" not in text.lower() and "api_key" not in text.lower(), text[-2000:]
    assert not lines_with(text, "fewstep: warning"), text[-2000:]
    assert not (tmp_path / "hydra" / "wandb").exists() and not (run_dir / "wandb").exists()


def test_make_loggers_modes(tmp_path, monkeypatch):
    from fewstep.outputs import make_loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert make_loggers(compose_cfg(["logger=wandb", "logger.mode=disabled"]), tmp_path) == []
    monkeypatch.setenv("WANDB_MODE", "disabled")              # the environment wins, as for evaluate
    assert make_loggers(compose_cfg(["logger=wandb", "logger.mode=online"]), tmp_path) == []


def test_skip_norms_and_tune_rho_claim_their_run_folder_like_evaluate(tmp_path, capsys):
    """task=skip_norms and task=tune_rho: metrics.json carries the config_hash, resume=true with the same config
    returns it without running, and a busy folder is refused (one line, exit 2 through dispatch)."""
    from conftest import TINY_OVERRIDES, compose_cfg
    from fewstep.run_folder import RunFolder, RunFolderBusy
    from fewstep.tasks import skip_norms

    base = [*TINY_OVERRIDES, "task=skip_norms", "sampler.steps=2", "logger=none", "skip.rho_bottom=0.8"]
    out = tmp_path / "norms"
    first = skip_norms.run(compose_cfg(base), out_dir=str(out))
    assert "config_hash" in first and json.loads((out / "metrics.json").read_text()) == first
    stamp = (out / "metrics.json").stat().st_mtime_ns
    again = skip_norms.run(compose_cfg(base + ["resume=true"]), out_dir=str(out))
    assert again == first and (out / "metrics.json").stat().st_mtime_ns == stamp
    assert "nothing to do" in capsys.readouterr().out
    lock = RunFolder(out).acquire()
    try:
        with pytest.raises(RunFolderBusy):
            skip_norms.run(compose_cfg(base), out_dir=str(out))
    finally:
        lock.release()


def test_a_wandb_failure_during_training_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, capsys):
    """Lightning's own calls on the W&B logger in fit (hyperparameters, metrics, images) fail soft."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from fewstep.loggers import make_loggers
    from fewstep.tasks.train import DiffusionModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg([*TINY_OVERRIDES, "task=train", "logger=wandb"])
    (logger,) = make_loggers(cfg, tmp_path)
    calls = []

    def broken_log(*args, **kwargs):
        calls.append(1)
        raise OSError("no space left on device")

    monkeypatch.setattr(logger.experiment, "log", broken_log)
    module = DiffusionModule(OmegaConf.to_container(cfg.backbone.config, resolve=True),
                             OmegaConf.to_container(cfg.backbone.schedule, resolve=True),
                             lr=1e-3, warmup_steps=1, max_steps=4, backbone="unet")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=[logger], log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    logger.log_image("samples", [str(tmp_path / "none.png")], step=4)   # quiet after the first failure
    logger.experiment.finish()
    assert trainer.global_step == 4 and len(calls) == 1
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "W&B" in ln]
    assert len(warnings) == 1 and "no space left on device" in warnings[0] and "training goes on" in warnings[0]
