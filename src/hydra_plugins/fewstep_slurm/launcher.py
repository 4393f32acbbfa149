"""hydra/launcher=submitit_slurm: hydra-submitit-launcher's SlurmLauncher with fewstep's resume, GPUs per node from the
trainer and job states without accounting (the work is done in fewstep.slurm; Hydra takes launcher classes from the
hydra_plugins package only). Without hydra-submitit-launcher installed this module defines nothing, so Hydra's
plugin scan stays quiet for users who never select the launcher.

conf/hydra/launcher/submitit_slurm.yaml is validated against the plugin's schema of the same name (SlurmQueueConf),
so it holds only that schema's keys; its gpus_per_node is ${slurm_gpus_per_node:${trainer.accelerator},${trainer.devices}}
(the resolver is registered here: Hydra imports this module before it composes a config)."""
from typing import Any, Sequence

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
except ImportError:  # pip install -e ".[slurm]"
    _SubmititSlurmLauncher = None

if _SubmititSlurmLauncher is not None:
    from omegaconf import OmegaConf

    def _gpus_per_node(accelerator, devices):
        from fewstep.slurm import gpus_per_node

        return gpus_per_node(accelerator, devices)

    OmegaConf.register_new_resolver("slurm_gpus_per_node", _gpus_per_node, replace=True)

    class SlurmLauncher(_SubmititSlurmLauncher):
        """See fewstep.slurm (module doc)."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
            from fewstep.slurm import launch

            return launch(self, job_overrides, initial_job_idx)
