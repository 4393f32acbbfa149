"""The launcher of `hydra/launcher=submitit_slurm` (conf/hydra/launcher/submitit_slurm.yaml): the SlurmLauncher of
hydra-submitit-launcher (the class is hydra_plugins.fewstep_slurm.launcher.SlurmLauncher: Hydra takes launchers from
the hydra_plugins package only; its work is done here), with three things a sweep on a SLURM cluster needs:

* resume=true: a job whose folder already holds a result of its config (`run_folder.finished_result`: same
  config_hash) is not submitted; it goes into the sweep summary as it is. A finished sweep re-submitted with
  resume=true submits no job at all.
* gpus_per_node (${slurm_gpus_per_node:${trainer.accelerator},${trainer.devices}}): trainer.devices GPUs per node
  when trainer.accelerator is gpu, none with a CPU trainer (trainer=cpu, trainer=ddp_cpu), so a CPU-only
  partition needs no hydra.launcher.gpus_per_node=null.
* job states on a cluster without accounting: submitit reads them from sacct, which fails there ("Bypassing
  sacct error" at every poll, and a cancelled job is never seen to end). Here sacct is tried first; where it
  fails, the states come from squeue (said once), and a job squeue no longer lists has ended.
  A job that has no result yet is looked up on submitit's schedule (2 s, 4 s, 8 s, ...), at most every
  STATUS_POLL_S seconds (submitit: 10 minutes).

A job past its time limit is signalled by SLURM (USR1, signal_delay_s before timeout_min) and requeued by
submitit up to max_num_timeout times; the requeued job runs again from the start (with resume=true the same
folder and config: its result is written once, by the run that finishes).
"""
from __future__ import annotations

import copy
import getpass
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict, read_write

from .config import ConfigError

log = logging.getLogger(__name__)

STATUS_POLL_S = 10


def gpus_per_node(accelerator, devices) -> Optional[int]:
    """The GPUs per node to ask SLURM for (the launcher config's default): trainer.devices with a gpu accelerator,
    None (no --gpus-per-node) with a cpu one."""
    accelerator = str(accelerator)
    if accelerator == "cpu":
        return None
    if accelerator in ("gpu", "cuda") and isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    raise ConfigError(f"hydra.launcher.gpus_per_node follows trainer.devices for trainer.accelerator=gpu and is none "
                      f"for cpu (got accelerator={accelerator}, devices={devices}): set hydra.launcher.gpus_per_node "
                      f"to a number or null")


def _squeue_info(watcher, user: str):
    """squeue's view of this user's jobs (pending, running and recently ended) as sacct's parsable output."""
    p = subprocess.run(["squeue", "-h", "--states=all", "-u", user, "-o", "%i|%T|%N"], capture_output=True, text=True,
                       timeout=60)
    if p.returncode != 0:
        return None
    return watcher.read_info("JobID|State|NodeList\n" + p.stdout)


def _make_watcher(delay_s: float):
    from submitit.slurm.slurm import SlurmInfoWatcher

    class StatesWatcher(SlurmInfoWatcher):
        """sacct, else squeue (see the module doc)."""

        sacct_works: Optional[bool] = None   # None: not tried yet

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            info = None
            if self.sacct_works is not False:
                p = subprocess.run(command, capture_output=True, text=True)
                if p.returncode == 0:
                    info, self.sacct_works = self.read_info(p.stdout), True
                elif self.sacct_works is None:
                    self.sacct_works = False
                    why = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
                    log.warning(f"sacct does not work on this cluster ({why}): job states come from squeue")
            if info is None:
                info = _squeue_info(self, getpass.getuser())
                if info is not None:   # a job squeue no longer lists has ended (and MinJobAge passed)
                    for job_id in self._registered - self._finished - set(info):
                        info[job_id] = {"JobID": job_id, "State": "ENDED", "NodeList": ""}
            if info:
                self._info_dict.update(info)
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    return StatesWatcher(delay_s=delay_s)


def finished_jobs(launcher, job_overrides, initial_job_idx: int):
    """{job index: JobReturn} of the jobs whose folder holds a result of their config (resume=true), each
    added to the sweep's job list (its summary row) as a job that ran."""
    from .run_folder import METRICS_FILE, finished_result
    from .sweeps import record_job

    done = {}
    hydra_cfg = HydraConfig.instance().cfg
    try:
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = idx
                cfg.hydra.job.id = f"job_id_for_{idx}"
            HydraConfig.instance().set_config(cfg)   # for ${hydra:job.num} in the job's folder name
            out = Path(os.path.abspath(os.path.join(str(OmegaConf.select(cfg, "hydra.sweep.dir")),
                                                    str(OmegaConf.select(cfg, "hydra.sweep.subdir")))))
            task_cfg = copy.deepcopy(cfg)
            with read_write(task_cfg), open_dict(task_cfg):
                del task_cfg["hydra"]
            if not task_cfg.resume:
                continue
            metrics, _ = finished_result(task_cfg, out)
            if metrics is None:
                continue
            ret = JobReturn(overrides=list(overrides), cfg=task_cfg, hydra_cfg=copy.deepcopy(cfg),
                            working_dir=os.getcwd(), task_name=str(cfg.hydra.job.name),
                            status=JobStatus.COMPLETED, _return_value=metrics)
            done[idx] = ret
            sweep_dir = Path(os.path.abspath(str(OmegaConf.select(cfg, "hydra.sweep.dir"))))
            record_job(sweep_dir.resolve(), idx, out.resolve())
            print(f"[fewstep] resume: {out / METRICS_FILE} was made by this config "
                  f"(config_hash {metrics['config_hash']}), not submitted")
    finally:
        HydraConfig.instance().cfg = hydra_cfg
    return done


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """SlurmLauncher.launch (launcher: hydra_plugins.fewstep_slurm.launcher.SlurmLauncher): submit the jobs of a
    sweep batch that are not finished yet, as hydra-submitit-launcher does (job numbers kept); see the module doc."""
    import submitit
    import submitit.slurm.slurm

    assert launcher.config is not None
    submitit.slurm.slurm.SlurmJob.watcher = _make_watcher(STATUS_POLL_S)

    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    done = finished_jobs(launcher, job_overrides, initial_job_idx)
    todo = [(initial_job_idx + i, ov) for i, ov in enumerate(job_overrides) if initial_job_idx + i not in done]
    log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
    if not todo:
        print(f"[fewstep] resume: all {len(done)} jobs of this sweep are finished, nothing submitted")
        return [done[initial_job_idx + i] for i in range(len(job_overrides))]

    init_keys = {"submitit_folder", "max_num_timeout"}
    executor = submitit.AutoExecutor(cluster="slurm", folder=launcher.params["submitit_folder"],
                                     slurm_max_num_timeout=launcher.params["max_num_timeout"])
    baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in baseparams else f"slurm_{k}": v
                                  for k, v in launcher.params.items() if k not in init_keys})
    state = Singleton.get_state()
    job_params: List[Any] = []
    for idx, overrides in todo:
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", state))
    jobs = executor.map_array(launcher, *zip(*job_params))
    results = {idx: job.results()[0] for (idx, _), job in zip(todo, jobs)}
    return [done.get(i, results.get(i)) for i in range(initial_job_idx, initial_job_idx + len(job_overrides))]
