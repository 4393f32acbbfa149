"""Backbones: the diffusers UNet2DModel adapter, U-ViT with its adapter, and the exact Gaussian-mixture model."""
