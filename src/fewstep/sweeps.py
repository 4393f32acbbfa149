"""A sweep's summary: one row per job of the last `-m` sweep (its overrides and metrics) in summary.csv /
summary.md (and a W&B table), written by the Hydra callback `SweepSummary` when the multirun ends."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .fileio import write_text_atomic
from .loggers import _one_line, wandb_init, wandb_mode, warn
from .run_folder import METRICS_FILE

SUMMARY_SKIP = ("config", "config_hash")
SWEEP_JOBS_FILE = ".fewstep_jobs"   # in the sweep folder: "<job num>\t<job folder>" per job of the last sweep


def collect_summary(sweep_dir: Path, jobs: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """One row per job folder of a sweep: its overrides and its metrics.json. jobs: only these job folders
    (paths relative to the sweep folder, in this order); None: every folder below it that holds a metrics.json.
    A job is named by its path relative to the sweep folder: an override value with a `/` (a model folder)
    nests Hydra's job folder below the sweep folder."""
    sweep_dir = Path(sweep_dir)
    if jobs is None:
        found = [f.parent for f in sweep_dir.rglob(METRICS_FILE) if "wandb" not in f.relative_to(sweep_dir).parts]
        name = {p: p.relative_to(sweep_dir).as_posix() for p in found}
        folders = sorted(found, key=lambda p: (len(name[p]), name[p]))
    else:
        folders = [sweep_dir / j for j in dict.fromkeys(jobs)]
    rows = []
    for job in folders:
        mfile = job / METRICS_FILE
        if not job.is_dir() or not mfile.exists():
            continue
        metrics = json.loads(mfile.read_text())
        ov_file = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(ov_file)) if ov_file.exists() else []
        row = {"job": job.relative_to(sweep_dir).as_posix(), "overrides": " ".join(overrides)}
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) and k not in SUMMARY_SKIP})
        rows.append(row)
    return rows


def sweep_jobs(sweep_dir: Path) -> Optional[List[str]]:
    """The job folders of the last sweep run into sweep_dir (by job number), as SweepSummary recorded them;
    None if it recorded none."""
    f = Path(sweep_dir) / SWEEP_JOBS_FILE
    if not f.exists():
        return None
    jobs = {}
    for line in f.read_text().splitlines():
        num, _, name = line.partition("\t")
        if name and num.strip().lstrip("-").isdigit():
            jobs[name] = int(num)          # a job recorded twice keeps its last number
    return sorted(jobs, key=lambda n: (jobs[n], n))


def record_job(sweep_dir: Path, num: int, out: Path) -> None:
    """Append job `num` (its folder `out`, inside sweep_dir) to the sweep's job list (SWEEP_JOBS_FILE): done by
    every job that ends (SweepSummary.on_job_end) and by a launcher for a job it skips as already finished."""
    line = f"{int(num)}\t{Path(out).relative_to(sweep_dir).as_posix()}\n".encode()
    fd = os.open(Path(sweep_dir) / SWEEP_JOBS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)               # one short O_APPEND write: jobs in parallel do not interleave
    finally:
        os.close(fd)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(sweep_dir: Path, rows: List[Dict[str, Any]] | None = None) -> List[Dict[str, Any]]:
    """summary.csv / summary.md of a sweep folder: the given rows, else one per job of its last sweep."""
    sweep_dir = Path(sweep_dir)
    rows = collect_summary(sweep_dir, sweep_jobs(sweep_dir)) if rows is None else rows
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(sweep_dir / "summary.csv", buf.getvalue())
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    write_text_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write summary.csv / summary.md (and a W&B table).

    The summary has one row per job of this sweep (a folder left in the sweep folder by an earlier sweep,
    e.g. one named by other overrides, is not in it): at the start the sweep folder's job list
    (.fewstep_jobs) is emptied, and every job appends its folder when it ends, in whatever process the
    launcher ran it."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(sweep_dir / SWEEP_JOBS_FILE, "")

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        try:
            from hydra.types import RunMode

            if config.hydra.mode != RunMode.MULTIRUN:
                return
            out = Path(str(config.hydra.runtime.output_dir)).resolve()
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not sweep_dir.is_absolute():   # relative to where the sweep was started (hydra.job.chdir may move)
                sweep_dir = Path(str(config.hydra.runtime.cwd)) / sweep_dir
            record_job(sweep_dir.resolve(), int(config.hydra.job.num), out)
        except Exception as e:  # the summary then falls back to every job folder
            warn(f"sweep job list not updated ({_one_line(e)})")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        jobs = sweep_jobs(sweep_dir)
        rows = write_summary(sweep_dir, collect_summary(sweep_dir, jobs))
        missing = f", {len(jobs) - len(rows)} without a metrics.json" if jobs is not None and len(jobs) > len(rows) else ""
        print(f"[fewstep] sweep summary: {sweep_dir / 'summary.md'} ({len(rows)} jobs{missing})")
        if config.logger.name == "wandb" and rows:
            run = wandb_init(config.logger, project=config.logger.project, group=sweep_dir.name,
                             mode=wandb_mode(config.logger), dir=str(sweep_dir), name=f"{sweep_dir.name}-summary", job_type="sweep_summary",
                             reinit="finish_previous")
            if run is None:
                return
            try:
                import wandb

                keys = list(dict.fromkeys(k for r in rows for k in r))
                run.log({"summary": wandb.Table(columns=keys, data=[[_fmt(r.get(k, "")) for k in keys] for r in rows])})
                run.finish()
            except (Exception, SystemExit) as e:  # the summary files are the record; W&B is a copy
                warn(f"W&B summary table not logged ({_one_line(e)})")
