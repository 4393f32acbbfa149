"""fewstep's Hydra launcher plugin (hydra/launcher=submitit_slurm): see fewstep.slurm."""
