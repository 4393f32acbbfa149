"""A Hydra callback the cluster tests (tests/test_slurm.py) hand to their SLURM jobs, to stop a job mid-run on cue.

    +hydra.callbacks.hold._target_=slurm_hooks.HoldBeforeResult +hydra.callbacks.hold.flag=<file>
    +hydra.callbacks.hold.log=<file> +hydra.callbacks.hold.first_attempt_only=<bool>

In the job it wraps fewstep's write_result (the one call that writes metrics.json, after the samples): while the
flag file exists, the job waits there (at most HOLD_S), so the test can scancel it, or SLURM can signal it
for its time limit, with the samples made and metrics.json not written yet. first_attempt_only: a job that
SLURM restarted (SLURM_RESTART_COUNT > 0, e.g. requeued by submitit after a timeout) does not wait.
Every start and every wait is one line in the log file: "start <restart count> <SLURM_JOB_ID>", "held ...".
Needs tests/ on the jobs' PYTHONPATH (the tests set it; SLURM passes the environment to the job).
"""
import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback

HOLD_S = 150


class HoldBeforeResult(Callback):
    def __init__(self, flag: str, log: str, first_attempt_only: bool) -> None:
        self.flag, self.log, self.first_attempt_only = Path(flag), Path(log), bool(first_attempt_only)

    def _note(self, what: str) -> None:
        line = f"{what} {os.environ.get('SLURM_RESTART_COUNT', '0')} {os.environ.get('SLURM_JOB_ID', '')}\n"
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def on_job_start(self, config, **kwargs) -> None:
        self._note("start")
        if self.first_attempt_only and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            return
        import fewstep.outputs
        import fewstep.run_folder

        write_result = fewstep.run_folder.write_result

        def held(*args, **kw):
            self._note("held")
            t0 = time.time()
            while self.flag.exists() and time.time() - t0 < HOLD_S:
                time.sleep(0.2)
            return write_result(*args, **kw)

        fewstep.run_folder.write_result = fewstep.outputs.write_result = held
