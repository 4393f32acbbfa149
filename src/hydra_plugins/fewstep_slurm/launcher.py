"""hydra/launcher=submitit_slurm: hydra-submitit-launcher's SlurmLauncher with fewstep's resume, gpus_per_node=auto
and job states without accounting (the work is done in fewstep.slurm; Hydra takes launcher classes from the
hydra_plugins package only). Without hydra-submitit-launcher installed this module defines nothing, so Hydra's
plugin scan stays quiet for users who never select the launcher. (No `from __future__ import annotations`: Hydra
loads this module outside sys.modules, where dataclasses cannot resolve string annotations.)"""

from dataclasses import dataclass
from typing import Any, Sequence

from omegaconf import MISSING

try:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
except ImportError:  # pip install -e ".[slurm]"
    _SubmititSlurmLauncher = None

if _SubmititSlurmLauncher is not None:
    from hydra.core.config_store import ConfigStore

    @dataclass
    class FewstepSlurmQueueConf(SlurmQueueConf):
        """The plugin's schema of conf/hydra/launcher/submitit_slurm.yaml (Hydra matches the YAML to the schema of
        the same name) with fewstep's keys; their values are set in that YAML only."""

        _target_: str = "hydra_plugins.fewstep_slurm.launcher.SlurmLauncher"
        gpus_per_node: Any = MISSING        # a number, null, or auto (fewstep.slurm.gpus_per_node)
        status_poll_s: float = MISSING

    # replaces the plugin's own schema of that name (imported just above, so this store comes last)
    ConfigStore.instance().store(group="hydra/launcher", name="submitit_slurm", node=FewstepSlurmQueueConf,
                                 provider="fewstep")

    class SlurmLauncher(_SubmititSlurmLauncher):
        """See fewstep.slurm (module doc)."""

        def __init__(self, **params: Any) -> None:
            from fewstep.slurm import OWN_KEYS

            own = {k: params.pop(k) for k in OWN_KEYS}
            super().__init__(**params)
            self.status_poll_s = float(own["status_poll_s"])
            self.gpus_setting = self.params["gpus_per_node"]

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
            from fewstep.slurm import launch

            return launch(self, job_overrides, initial_job_idx)
