"""diffusers UNet2DConditionModel (the Stable Diffusion family's UNet) as the same explicit walk.

UNet2DConditionModel's down blocks (CrossAttnDownBlock2D / DownBlock2D), mid block
(UNetMidBlock2DCrossAttn) and up blocks (CrossAttnUpBlock2D / UpBlock2D) have the structure of
UNet2DModel's: every resnet(+attention) and every downsampler of the encoder produces one skip tensor
(the res_samples), every resnet of the decoder concatenates one. So `SDUNetAdapter` is `UNetAdapter`
(backbones/unet.py: the skip numbering, `SkipInfo`, the skip hooks ``hook(i, d, u, t)``,
`forward_full` / `forward_partial` for DeepCache) with its context changed: a call's condition is the
text embedding ``encoder_hidden_states`` (B, L, D) -- the per-sample prompt embedding that the
denoiser carries like class labels -- and the adapter's context holds it beside the time embedding, for
the cross-attentions (Transformer2DModel) of the down, mid and up blocks.

With no hook installed the walk runs exactly the operations of ``UNet2DConditionModel.forward(x, t,
encoder_hidden_states)`` (time embedding, optional class embedding, conv_in, the blocks, conv_norm_out,
conv_act, conv_out), in the same order. Not supported (refused when the adapter is built): the
additional embeddings of SDXL-type models (addition_embed_type) and time conditioning inputs
(time_cond_proj_dim); latent sizes not divisible by 2^(number of upsamplers).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .unet import UNetAdapter


class TextContext(NamedTuple):
    emb: torch.Tensor                      # (B, time_embed_dim): time (+ class) embedding
    text: Optional[torch.Tensor]           # (B, L, cross_attention_dim): encoder_hidden_states


class SDUNetAdapter(UNetAdapter):
    """Layer-by-layer view of a diffusers `UNet2DConditionModel` with skip hooks and partial forwards."""

    def __init__(self, unet):
        c = unet.config
        if c.get("addition_embed_type") is not None:
            raise ValueError(f"backbone=sd_unet: addition_embed_type={c.addition_embed_type} (SDXL-type added "
                             f"conditions) is not supported; Stable Diffusion 1.x / 2.x UNets have none")
        if c.get("time_cond_proj_dim") is not None:
            raise ValueError("backbone=sd_unet: time_cond_proj_dim (LCM-type guidance embedding) is not supported")
        super().__init__(unet)

    def embed(self, x: torch.Tensor, t, encoder_hidden_states=None, class_labels=None) -> TextContext:
        u = self.unet
        if encoder_hidden_states is None:
            raise ValueError("backbone=sd_unet is text-conditional: pass encoder_hidden_states (the prompt "
                             "embeddings, dataset=prompts)")
        up = 2 ** u.num_upsamplers
        if any(d % up for d in x.shape[-2:]):
            raise ValueError(f"backbone=sd_unet: the latent size {tuple(x.shape[-2:])} must be divisible by {up}")
        emb = u.time_embedding(u.get_time_embed(sample=x.to(u.dtype), timestep=t), None)
        class_emb = u.get_class_embed(sample=x, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if u.config.class_embeddings_concat else emb + class_emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        text = u.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states.to(u.dtype),
                                               added_cond_kwargs=None)
        return TextContext(emb, text)

    def encode(self, x: torch.Tensor, emb, upto: Optional[int] = None):
        """UNetAdapter.encode in the weights' dtype (backbone.dtype fp16 / bf16: the sampler's x is float32)."""
        return super().encode(x.to(self.unet.dtype), emb, upto)

    def _temb(self, ctx: TextContext):
        return ctx.emb

    def _attend(self, attn, h, ctx: TextContext):
        return attn(h, encoder_hidden_states=ctx.text, return_dict=False)[0]

    def _mid(self, h, ctx: TextContext):
        mid = self.unet.mid_block
        if mid is None:
            return h
        if getattr(mid, "has_cross_attention", False):
            return mid(h, ctx.emb, encoder_hidden_states=ctx.text)
        return mid(h, ctx.emb)

    def head(self, h, skip_up, t_batch):
        u = self.unet
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)
