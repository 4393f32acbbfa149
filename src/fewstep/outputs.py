"""What a run leaves behind, one module for each part, every name importable from here as well:

    images.py       sample grids (PNG), 2-D scatter plots, the uint8 quantization of images
    run_folder.py   the job's folder: metrics.json (written last, atomically, with the config_hash that
                    resume=true checks), the folder lock, an earlier result moved aside
    loggers.py      W&B (offline by default) / csv / none: `RunLogger` for one result, `make_loggers` for the
                    Lightning tasks, both from one set of settings; a logger failure is one warning line
    sweeps.py       summary.csv / summary.md of a sweep (the Hydra callback `SweepSummary`, which
                    conf/config.yaml names as fewstep.outputs.SweepSummary)
    fileio.py       atomic_path / write_*_atomic: the one way any of them replaces a file
"""
from __future__ import annotations

from .fileio import atomic_path, strict_json, write_bytes_atomic, write_json_atomic, write_text_atomic
from .images import save_grid, save_points_plot, to_uint8
from .loggers import (WANDB_KEYLESS_MODES, RunLogger, finish_loggers, make_loggers,
                      read_offline_run, wandb_api_key_found, wandb_init, wandb_may_start, wandb_mode,
                      wandb_sdk_settings, wandb_settings, wandb_skip_reason, warn)
from .run_folder import (HASH_IGNORED, LOCK_FILE, METRICS_FILE, RESULT_CONFIG_FILE, RESULT_FILES, RunFolder,
                         RunFolderBusy, config_diff, config_hash, finished_result, hashed_config, move_results_aside,
                         output_dir, write_result)
from .sweeps import SUMMARY_SKIP, SWEEP_JOBS_FILE, SweepSummary, collect_summary, sweep_jobs, write_summary

__all__ = [
    "atomic_path", "strict_json", "write_bytes_atomic", "write_json_atomic", "write_text_atomic",
    "save_grid", "save_points_plot", "to_uint8",
    "WANDB_KEYLESS_MODES", "RunLogger", "finish_loggers", "make_loggers", "read_offline_run",
    "wandb_api_key_found", "wandb_init", "wandb_may_start", "wandb_mode", "wandb_sdk_settings", "wandb_settings",
    "wandb_skip_reason", "warn",
    "HASH_IGNORED", "LOCK_FILE", "METRICS_FILE", "RESULT_CONFIG_FILE", "RESULT_FILES", "RunFolder", "RunFolderBusy",
    "config_diff", "config_hash", "finished_result", "hashed_config", "move_results_aside", "output_dir",
    "write_result",
    "SUMMARY_SKIP", "SWEEP_JOBS_FILE", "SweepSummary", "collect_summary", "sweep_jobs", "write_summary",
]
