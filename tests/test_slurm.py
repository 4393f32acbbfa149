"""The cluster path, for real: sweeps and multi-process jobs through `hydra/launcher=submitit_slurm` on a single-node
SLURM cluster that scripts/slurm_cluster.sh brings up on this machine (installing slurm-wlm and munge with apt when
they are missing: root only). Where it cannot (not root, no apt-get), the cluster tests are skipped and the reason
is printed. The jobs are tiny exact-GMM runs (experiment=gmm_demo, 64 samples), all submitted at once at the start
(`submissions`) so that they share the machine's CPUs and the whole file takes a couple of minutes.

Each job asks for 1 CPU and 1 GB and no GPU, without hydra.launcher.gpus_per_node: with trainer=cpu / ddp_cpu the
launcher asks for none by itself (on this GPU-less node a GPU request could never be met)."""
from __future__ import annotations

import csv
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
TIMING_KEYS = {"wall_time_s", "images_per_s", "world_size", "config_hash"}   # config_hash: the trainer differs


def readme_example(trainer: str):
    """The arguments of the README's SLURM example with `trainer` (its Scaling out section)."""
    prefix = "python run.py -m hydra/launcher=submitit_slurm "
    (line,) = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()
               if ln.strip().startswith(prefix) and f" trainer={trainer} " in f"{ln} "]
    return line.split()[2:]


README_CPU = readme_example("cpu")    # -m hydra/launcher=submitit_slurm ... trainer=cpu experiment=gmm_demo sampler.steps=3,5
# every job here: the README's CPU example's launcher and experiment, tiny (64 samples), with resume and fast polls
COMMON = [a for a in README_CPU if not a.startswith(("trainer=", "sampler.steps="))] + [
    "n_samples=64", "batch_size=64", "logger=none", "resume=true", "hydra.launcher.timeout_min=5"]
SWEEP = [a for a in README_CPU if a.startswith(("trainer=", "sampler.steps="))]   # trainer=cpu sampler.steps=3,5


def hold(base: Path, name: str, first_attempt_only: bool = False):
    """Overrides that make the job wait before it writes metrics.json while base/<name>.hold exists
    (tests/slurm_hooks.py), logging to base/<name>.log."""
    return ["+hydra.callbacks.hold._target_=slurm_hooks.HoldBeforeResult", f"+hydra.callbacks.hold.flag={base / name}.hold",
            f"+hydra.callbacks.hold.log={base / name}.log", f"+hydra.callbacks.hold.first_attempt_only={first_attempt_only}"]


# -------------------------------------------------------------------------------- without a cluster
def test_gpus_per_node_follows_the_trainer():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from omegaconf.errors import InterpolationResolutionError

    from conftest import CONF

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

    def launcher(overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", return_hydra_config=True,
                           overrides=["hydra/launcher=submitit_slurm", *overrides]).hydra.launcher

    for trainer, devices, want in (("cpu", 1, None), ("ddp_cpu", 2, None), ("gpu", 1, 1), ("ddp", 4, 4)):
        cfg = launcher([f"trainer={trainer}", f"trainer.devices={devices}"])
        assert (cfg.gpus_per_node, cfg.tasks_per_node) == (want, devices), trainer
    assert launcher(["trainer=gpu", "hydra.launcher.gpus_per_node=null"]).gpus_per_node is None   # by hand: as set
    assert launcher(["trainer=cpu", "hydra.launcher.gpus_per_node=2"]).gpus_per_node == 2
    with pytest.raises(InterpolationResolutionError, match="ConfigError.*set hydra.launcher.gpus_per_node"):
        launcher(["trainer=ddp", "trainer.devices=-1"]).gpus_per_node
    # the README's examples: the CPU one asks for no GPU, the GPU one for 4 GPUs and 4 tasks per node on partition gpu
    gpu = readme_example("ddp")
    assert gpu[:2] == ["-m", "hydra/launcher=submitit_slurm"]
    assert "gpus_per_node" not in " ".join(gpu + README_CPU)
    cfg = launcher([a for a in gpu[2:] if "," not in a])
    assert (cfg.gpus_per_node, cfg.tasks_per_node, cfg.partition) == (4, 4, "gpu")
    assert launcher([a for a in README_CPU[2:] if "," not in a]).gpus_per_node is None


# -------------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def cluster(request):
    """The single-node cluster (scripts/slurm_cluster.sh up), stopped at the end by the same script if this
    fixture started it (a cluster already up, e.g. started by .ci/run, is left to whoever started it)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def skip(reason):
        if reporter is not None:   # on the terminal, not in the captured output of the test that asked first
            with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
                reporter.write_line(f"\ntests/test_slurm.py: the cluster tests are skipped: {reason}", yellow=True)
        pytest.skip(reason)

    # one test session at a time on the cluster (its state folder): another one skips, saying so
    state = Path(os.environ.get("FEWSTEP_SLURM_DIR", "/tmp/fewstep-slurm"))
    state.mkdir(parents=True, exist_ok=True)
    lock = open(state / "pytest.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        skip(f"the cluster in {state} is in use by another test session")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).returncode == 0
    p = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    if p.returncode == 3:
        lock.close()
        skip("no SLURM cluster: " + (p.stdout.strip().splitlines() or ["slurm_cluster.sh up: exit 3"])[-1])
    assert p.returncode == 0, f"scripts/slurm_cluster.sh up failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}"
    conf = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True).stdout.strip().split("=", 1)[1]
    try:
        yield {"SLURM_CONF": conf}
    finally:
        if not was_up:
            d = subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=120)
            if reporter is not None and d.returncode != 0:
                reporter.write_line(f"scripts/slurm_cluster.sh down: {d.stdout[-1000:]} {d.stderr[-1000:]}")
        lock.close()


def job_env(cluster):
    return dict(os.environ, **cluster, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))


class Submission:
    """One `run.py -m ...` through the SLURM launcher, running in the background (its own output files)."""

    def __init__(self, base: Path, name: str, args, env):
        self.sweep, self.args, self.env = base / name, [*COMMON, *args, f"hydra.sweep.dir={base / name}"], env
        self.out = base / f"{name}.stdout"
        self.proc = self.start()

    def start(self):
        with open(self.out, "a") as f:
            return subprocess.Popen([sys.executable, str(REPO / "run.py"), *self.args], cwd=REPO, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self, timeout=240) -> str:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.sweep.name}: still running after {timeout} s\n{self.report()}")
        return self.out.read_text()

    def report(self) -> str:
        queue = subprocess.run(["squeue", "--states=all", "-o", "%i %T %r %C %j"], env=self.env, capture_output=True,
                               text=True).stdout
        text = [self.out.read_text()[-3000:], f"--- squeue\n{queue}"]
        for log in sorted(self.sweep.glob(".submitit/*/*log.*"))[-4:]:
            text.append(f"--- {log}\n{log.read_text()[-1500:]}")
        return "\n".join(text)

    def job_ids(self):
        """The SLURM jobs submitted for this sweep folder: submitit's folder of each (<id>, or <array id>_<index>)."""
        return sorted(p.parent.name for p in (self.sweep / ".submitit").glob("*/*_submitted.pkl"))

    def jobs(self):
        """The job folders that hold a metrics.json, by job number."""
        return sorted(p for p in self.sweep.glob("[0-9]*") if (p / "metrics.json").exists())


@pytest.fixture(scope="module")
def submissions(cluster, tmp_path_factory):
    """Every cluster job of this file submitted at once; the launcher processes are ended at the end, and any job
    of theirs still in the queue is cancelled."""
    base = tmp_path_factory.mktemp("slurm")
    env = job_env(cluster)
    (base / "cancel.hold").touch()
    (base / "timeout.hold").touch()
    subs = {
        "sweep": Submission(base, "sweep", SWEEP, env),
        "ddp": Submission(base, "ddp", ["sampler.steps=3", "trainer=ddp_cpu", "trainer.devices=2"], env),
        "cancel": Submission(base, "cancel", ["trainer=cpu", "sampler.steps=4", *hold(base, "cancel")], env),
        # submitit's USR2 comes signal_delay_s before the 2-minute limit; slurmctld looks every 30 s and signals
        # once fewer than signal_delay_s + 30 s are left: 89-119 s after the start, by when the job waits in its
        # hold (a 1-minute limit signalled at 29 s, before a job on a loaded CI machine had got there). A timeout
        # to submitit, which requeues the job (max_num_timeout); the requeued run does not wait (one more timeout
        # allowed, should it take more than 89 s on a busy machine)
        "timeout": Submission(base, "timeout", ["trainer=cpu", "sampler.steps=6",
                                                *hold(base, "timeout", first_attempt_only=True),
                                                "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=1",
                                                "hydra.launcher.max_num_timeout=2"], env),
    }
    t0 = time.time()
    yield base, subs, env
    for s in subs.values():
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
    ids = [j.split("_")[0] for s in subs.values() for j in s.job_ids()]
    if ids:
        subprocess.run(["scancel", *sorted(set(ids))], env=env, capture_output=True)
    print(f"\n[test_slurm] cluster jobs: {time.time() - t0:.0f} s")


def squeue_state(job_id: str, env) -> str:
    p = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
    return p.stdout.strip()


def wait_for(cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out ({timeout} s) waiting for {what}")


def log_lines(base: Path, name: str):
    f = base / f"{name}.log"
    return f.read_text().split("\n")[:-1] if f.exists() else []


def test_sweep_of_two_jobs_gives_both_results_and_a_two_row_summary(submissions):
    base, subs, _ = submissions
    s = subs["sweep"]
    out = s.wait()
    assert s.proc.returncode == 0, s.report()
    jobs = s.jobs()
    assert [json.loads((j / "metrics.json").read_text())["nfe"] for j in jobs] == [3, 5], s.report()
    with open(s.sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == [j.name for j in jobs] and [r["steps"] for r in rows] == ["3", "5"]
    # no GPU asked for (trainer=cpu), 1 CPU per task as asked; sacct's failure said once, not at every poll
    sbatch = [p.read_text() for p in s.sweep.glob(".submitit/*/*submission.sh")]
    assert sbatch and all("--cpus-per-task=1" in t and "gpu" not in t for t in sbatch), sbatch[:1]
    assert "Bypassing sacct error" not in out and out.count("sacct") <= 1, out[-3000:]


def test_finished_sweep_resubmitted_with_resume_submits_no_job(submissions):
    base, subs, env = submissions
    s = subs["sweep"]
    s.wait()
    jobs, ids = s.jobs(), s.job_ids()
    stamps = {j: (j / "metrics.json").stat().st_mtime_ns for j in jobs}
    assert len(jobs) == 2, s.report()
    again = Submission(base, "sweep", SWEEP, env)
    out = again.wait(120)
    assert again.proc.returncode == 0, again.report()
    assert out.count("not submitted") == 2 and "nothing submitted" in out, out[-2000:]
    assert s.job_ids() == ids                                   # no new job folder: nothing went to sbatch
    assert {j: (j / "metrics.json").stat().st_mtime_ns for j in jobs} == stamps
    with open(s.sweep / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_two_task_ddp_cpu_job_equals_the_one_process_result(submissions):
    base, subs, _ = submissions
    d, s = subs["ddp"], subs["sweep"]
    d.wait()
    s.wait()
    assert d.proc.returncode == 0, d.report()
    (two,), one = d.jobs(), s.jobs()[0]                       # sampler.steps=3 both
    (job,) = d.job_ids()
    tasks = sorted(p.name for p in (d.sweep / ".submitit" / job).glob("*_log.out"))
    assert len(tasks) == 2, tasks                              # SLURM started the 2 ranks (tasks_per_node=2)
    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in (one, two))
    assert m2["world_size"] == 2 and "world_size" not in m1
    assert m1.keys() | {"world_size"} == m2.keys()
    for k in m1.keys() - TIMING_KEYS:
        if isinstance(m1[k], float):
            assert m2[k] == pytest.approx(m1[k], rel=1e-9, abs=1e-12), k
        else:
            assert m2[k] == m1[k], k
    # the samples: the GMM run's scatter plot of every sample (its only file of them), byte for byte
    assert (one / "samples.png").read_bytes() == (two / "samples.png").read_bytes()


def test_job_cancelled_mid_run_leaves_no_metrics_and_the_resumed_sweep_runs_it_again(submissions):
    base, subs, env = submissions
    c = subs["cancel"]
    held = wait_for(lambda: [ln for ln in log_lines(base, "cancel") if ln.startswith("held")], 180,
                    f"the job to reach its result\n{c.report()}")
    job_id = held[0].split()[2]
    assert squeue_state(job_id, env) == "RUNNING"
    subprocess.run(["scancel", job_id], env=env, check=True)
    wait_for(lambda: squeue_state(job_id, env) == "CANCELLED", 60, f"job {job_id} to be cancelled")
    (folder,) = [p for p in c.sweep.glob("[0-9]*") if p.is_dir()]
    assert not (folder / "metrics.json").exists()
    (base / "cancel.hold").unlink()
    again = Submission(base, "cancel", ["trainer=cpu", "sampler.steps=4", *hold(base, "cancel")], env)
    again.wait(180)
    assert again.proc.returncode == 0, again.report()
    assert json.loads((folder / "metrics.json").read_text())["nfe"] == 4
    assert [ln.split()[0] for ln in log_lines(base, "cancel")] == ["start", "held", "start", "held"]
    assert len(c.job_ids()) == 2                               # it was submitted again
    out = c.wait(120)                                          # the first submission reports the cancelled job
    assert c.proc.returncode != 0 and "CANCELLED" in out, out[-2000:]


def test_job_past_its_time_limit_is_requeued_and_finishes_with_resume(submissions):
    base, subs, env = submissions
    t = subs["timeout"]
    t.wait(420)
    assert t.proc.returncode == 0, t.report()
    (folder,) = t.jobs()
    assert json.loads((folder / "metrics.json").read_text())["nfe"] == 6
    attempts = [tuple(ln.split()[:2]) for ln in log_lines(base, "timeout")]
    assert attempts[:3] == [("start", "0"), ("held", "0"), ("start", "1")], attempts   # signalled, then requeued
    assert all(a[0] == "start" for a in attempts[3:]), attempts
    (job,) = t.job_ids()
    logs = "".join(p.read_text() for p in (t.sweep / ".submitit" / job).glob("*_log.*"))
    assert "timed-out" in logs and "Requeued" in logs, logs[-2000:]
