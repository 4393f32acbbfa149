"""fewstep: make pretrained diffusion models sample well in few steps."""
__version__ = "0.1.0"
