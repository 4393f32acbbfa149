"""Backbones: the diffusers UNet2DModel adapter and the exact Gaussian-mixture model."""
