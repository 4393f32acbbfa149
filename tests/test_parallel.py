"""Multi-process evaluation (Lightning Fabric, gloo on CPU), resumable sweeps, the SLURM launcher config."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CONF, REPO, compose_cfg

TIMING_KEYS = {"wall_time_s", "images_per_s", "world_size", "config_hash"}  # config_hash: trainer differs


def test_shard_and_gather_single_process():
    from fewstep.parallel import SINGLE, gather_by_index, is_multiprocess, shard

    parts = [shard(10, r, 3) for r in range(3)]
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    x = torch.arange(5.0)[:, None]
    assert gather_by_index(x[[3, 1, 4, 0, 2]], [3, 1, 4, 0, 2], SINGLE, keep=3).flatten().tolist() == [0.0, 1.0, 2.0]
    for name, multi in (("cpu", False), ("gpu", False), ("ddp", True), ("ddp_cpu", True)):
        assert is_multiprocess(compose_cfg([f"trainer={name}"]).trainer) is multi
    assert is_multiprocess(compose_cfg(["trainer.devices=4"]).trainer)
    with pytest.raises(ValueError, match="rank must be in"):
        shard(4, 2, 2)


def test_two_process_cpu_ddp_equals_one_process(tmp_path):
    """trainer=ddp_cpu trainer.devices=2 (gloo): the same samples, FID, precision/recall and IS as one process."""
    from conftest import make_tiny_unet
    from fewstep.tasks.evaluate import run

    unet_dir = tmp_path / "unet"
    make_tiny_unet(sample_size=28, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(unet_dir)
    common = ["dataset=fashion_mnist", f"backbone.pretrained={unet_dir}", "sampler=dpmpp", "sampler.steps=3",
              "n_samples=12", "batch_size=3", "metrics=default", "metrics.is_splits=3", "metrics.pr_k=2",
              "save_samples=true", "logger=none", "task.grid_size=8", "device=cpu"]
    one = run(compose_cfg(common), out=tmp_path / "one")
    two = run(compose_cfg(common + ["trainer=ddp_cpu", "trainer.devices=2"]), out=tmp_path / "two")
    assert two["world_size"] == 2 and "world_size" not in one
    s1, s2 = (np.load(tmp_path / d / "samples.npz")["images"] for d in ("one", "two"))
    assert s1.shape == (12, 1, 28, 28) and np.array_equal(s1, s2)
    assert (tmp_path / "one" / "samples.png").read_bytes() == (tmp_path / "two" / "samples.png").read_bytes()
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m1.keys() | {"world_size"} == m2.keys()
    assert {"fid", "precision", "recall", "inception_score", "nfe", "macs_per_sample"} <= m1.keys()
    for k in m1.keys() - TIMING_KEYS:
        if isinstance(m1[k], float):   # reductions (FID sums, its bootstrap, IS): another order across ranks
            assert m2[k] == pytest.approx(m1[k], rel=1e-9, abs=1e-12), k
        else:
            assert m2[k] == m1[k], k


def run_py(*args):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


def test_finished_sweep_rerun_with_resume_launches_no_work(tmp_path):
    """A re-run of a finished sweep (same hydra.sweep.dir, resume=true) samples nothing and logs no job runs;
    the sweep's W&B summary table is written offline both times."""
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=gmm_demo", "sampler.steps=2,3", "n_samples=64", "batch_size=64", "logger=wandb",
            "resume=true", f"hydra.sweep.dir={sweep}"]
    run_py(*args)
    jobs = sorted(d for d in sweep.iterdir() if (d / "metrics.json").exists())
    assert len(jobs) == 2
    stamp = {p: p.stat().st_mtime_ns for j in jobs for p in (j / "metrics.json", j / "samples.png")}
    job_runs = {j: sorted((j / "wandb").glob("offline-run-*")) for j in jobs}
    assert all(len(r) == 1 for r in job_runs.values())
    tables = list((sweep / "wandb").glob("offline-run-*/files/media/table/summary_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 2 and "nfe" in table["columns"]

    p = run_py(*args)
    assert p.stdout.count("nothing to do") == 2
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp           # nothing re-sampled or re-written
    assert {j: sorted((j / "wandb").glob("offline-run-*")) for j in jobs} == job_runs
    assert len(list((sweep / "wandb").glob("offline-run-*/files/media/table/summary_*.table.json"))) == 2


def test_slurm_launcher_config_composes_only_when_selected():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = compose(config_name="config", return_hydra_config=True)
        assert default.hydra.launcher._target_.endswith("BasicLauncher")
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "trainer=ddp",
                                 "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.fewstep_slurm.launcher.SlurmLauncher"   # fewstep.slurm
    assert (launcher.partition, launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == ("gpu", 4, 4, 2)
    assert launcher.timeout_min > 0


def test_spawned_ranks_return_a_large_result(tmp_path):
    """Rank 0's return value reaches the parent whatever its size (a pipe would block past 64 kB), and
    every spawned rank has torn its process group down before it exits (a gloo group left to interpreter
    shutdown can abort the rank with SIGABRT)."""
    script = tmp_path / "big.py"
    script.write_text(
        "import atexit\n"
        "import torch\n"
        "import torch.distributed as tdist\n"
        "from omegaconf import OmegaConf\n"
        "from fewstep.parallel import run_parallel\n\n\n"
        "def record(rank):\n"
        "    with open(f'group_at_exit_{rank}.txt', 'w') as f:\n"
        "        f.write(str(tdist.is_initialized()))\n\n\n"
        "def big(dist):\n"
        "    atexit.register(record, dist.rank)\n"
        "    return {'rank': dist.rank, 'world': dist.world, 'x': torch.arange(500_000, dtype=torch.float32)}  # 2 MB\n\n\n"
        "if __name__ == '__main__':\n"
        "    cfg = OmegaConf.create({'accelerator': 'cpu', 'devices': 2, 'num_nodes': 1, 'strategy': 'ddp'})\n"
        "    out = run_parallel(cfg, big)\n"
        "    assert (out['rank'], out['world']) == (0, 2), out\n"
        "    assert torch.equal(out['x'], torch.arange(500_000, dtype=torch.float32))\n"
        "    print('returned', out['x'].numel())\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0 and "returned 500000" in p.stdout, p.stderr[-2000:]
    assert [(tmp_path / f"group_at_exit_{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]
