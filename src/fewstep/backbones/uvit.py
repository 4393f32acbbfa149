"""U-ViT (Bao et al., CVPR 2023, arXiv 2209.12152): a ViT denoiser with long skip connections.

Everything is a token: the image is cut into p x p patches (a stride-p convolution), the
timestep (and, for a class-conditional model, the label) becomes one more token in front,
and a learned position embedding is added. Then

    in blocks   B_0 .. B_{n-1}   each output h_m is kept as a long skip (m = 0 the shallowest)
    mid block   M
    out blocks  O_0 .. O_{n-1}   O_i: u <- Linear_{2D -> D}(concat(u, h_{n-1-i})), then the block

(n = depth // 2), so out block 0 consumes the deepest skip and out block n-1 the shallowest.
Head: LayerNorm, Linear to p^2 C per patch token, unpatchify, and a 3x3 convolution
(`conv: true`, the paper's choice). A block is pre-LN: u + Attn(LN(u)), then u + MLP(LN(u)).

`UViT` is the plain network (a diffusers ModelMixin: save_pretrained / from_pretrained, and
`forward(x, t).sample` like UNet2DModel, so task=train trains it unchanged). `UViTAdapter`
walks the same layers with the interface of `UNetAdapter` -- skip hooks, `skips`, and the
partial forwards of DeepCache -- so Skip-Tuning, learned rho, the skip-norm diagnostic and
DeepCache act on U-ViT's long skips exactly as on a UNet's. Depth index i = n - 1 - m is the
out block that consumes skip m: i = 0 the deepest. All skips have the same resolution (level 0).
Its blocks' residual branches (attention and MLP outputs, blocks in execution order) take the residual
hooks of skip=residual (strategies/residual.py), as a DiT's do.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .dit import residual_infos
from .unet import SkipHook, SkipInfo


def check_uvit_config(sample_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int) -> None:
    """One ValueError line per impossible U-ViT shape, before anything is built."""
    if patch_size < 1 or sample_size % patch_size:
        raise ValueError(f"U-ViT patch_size={patch_size} must divide the image size {sample_size}")
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(f"U-ViT embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
    if depth < 2:
        raise ValueError(f"U-ViT depth={depth} must be >= 2 (depth // 2 in blocks, 1 mid block, depth // 2 out blocks)")


def batch_timesteps(x: torch.Tensor, t) -> torch.Tensor:
    """A scalar, (1,) or (B,) timestep -> the (B,) float timesteps of the batch x."""
    t = torch.as_tensor(t, device=x.device)
    return (t.reshape(-1) * torch.ones(x.shape[0], device=x.device)).float()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-LN transformer block; with `skip`, first fuse the long skip: u <- Linear(concat(u, h))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(ModelMixin, ConfigMixin):
    """The U-ViT network: forward(x, t, class_labels=None).sample = eps_theta (or x0 / v) of shape x."""

    @register_to_config
    def __init__(self, sample_size: int = 28, in_channels: int = 1, out_channels: int = 1, patch_size: int = 2,
                 embed_dim: int = 128, depth: int = 7, num_heads: int = 4, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, mlp_time_embed: bool = False, conv: bool = True,
                 num_classes: Optional[int] = None):
        super().__init__()
        check_uvit_config(sample_size, patch_size, embed_dim, depth, num_heads)
        D = embed_dim
        self.patch_embed = nn.Conv2d(in_channels, D, kernel_size=patch_size, stride=patch_size)
        self.time_embed = (nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D)) if mlp_time_embed
                           else nn.Identity())
        self.label_emb = nn.Embedding(num_classes, D) if num_classes else None
        self.extras = 1 + (1 if num_classes else 0)
        num_patches = (sample_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, D))
        n = depth // 2
        self.in_blocks = nn.ModuleList([Block(D, num_heads, mlp_ratio, qkv_bias) for _ in range(n)])
        self.mid_block = Block(D, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList([Block(D, num_heads, mlp_ratio, qkv_bias, skip=True) for _ in range(n)])
        self.norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, patch_size ** 2 * out_channels)
        self.final_layer = nn.Conv2d(out_channels, out_channels, 3, padding=1) if conv else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ pieces
    def tokens(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """(B, C, H, W) image and timesteps -> (B, extras + H W / p^2, D) tokens with position embedding."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        emb = get_timestep_embedding(batch_timesteps(x, t), self.config.embed_dim, flip_sin_to_cos=True,
                                     downscale_freq_shift=0)
        extra = [self.time_embed(emb.to(h.dtype))[:, None]]
        if self.label_emb is not None:
            if class_labels is None:
                raise ValueError("this U-ViT is class-conditional: pass class_labels")
            extra.append(self.label_emb(class_labels)[:, None])
        return torch.cat([*reversed(extra), h], dim=1) + self.pos_embed

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Tokens -> image: LayerNorm, per-patch linear, unpatchify, 3x3 conv."""
        p, C, S = self.config.patch_size, self.config.out_channels, self.config.sample_size
        h = self.decoder_pred(self.norm(h))[:, self.extras:]
        g = S // p
        h = h.reshape(-1, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(-1, C, S, S)
        return self.final_layer(h)

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True):
        h = self.tokens(sample, timestep, class_labels)
        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop())
        out = self.head(h)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class UViTAdapter(nn.Module):
    """U-ViT with skip hooks and DeepCache partial forwards (the interface of `UNetAdapter`).

    Skip m (0 = first in block's output) is consumed by out block i = k - m, k = n - 1; a hook
    ``hook(i, d, u, t) -> (d, u)`` sees d = h_m and the token state u right before out block i
    concatenates them. Partial forwards: `forward_full(x, t, branch)` also returns the state
    entering out block k - branch; `forward_partial(x, t, cache, branch)` runs the tokens, in blocks
    0..branch, then out blocks k - branch..k from the cache, then the head.
    """

    def __init__(self, uvit: UViT):
        super().__init__()
        self.uvit = uvit
        self.skip_hooks: List[SkipHook] = []
        n = len(uvit.in_blocks)
        self.num_skips = n
        self.num_levels = 1
        D = uvit.config.embed_dim
        self.skips = [SkipInfo(depth=i, index=n - 1 - i, level=0, channels=D, up_block=i, up_layer=0)
                      for i in range(n)]
        # residual branches (skip=residual): blocks b = 0 .. 2n in execution order (in, mid, out), branch
        # 2b = attention, 2b + 1 = MLP; hooks ``hook(i, r, h, t) -> (r, h)`` before h <- h + r
        self.residual_hooks: list = []
        self.residuals = residual_infos(2 * n + 1)

    @property
    def config(self):
        return self.uvit.config

    @property
    def dtype(self):
        return self.uvit.dtype

    def block(self, b: int, blk: Block, h, t, skip=None):
        """Block b (execution order) = blk(h, skip); with residual hooks, written out so that they see its
        attention and MLP outputs before they are added to the stream."""
        if not self.residual_hooks:
            return blk(h) if skip is None else blk(h, skip)
        if blk.skip_linear is not None:
            h = blk.skip_linear(torch.cat([h, skip], dim=-1))
        h = self._add_residual(2 * b, blk.attn(blk.norm1(h)), h, t)
        return self._add_residual(2 * b + 1, blk.mlp(blk.norm2(h)), h, t)

    def _add_residual(self, i: int, r, h, t):
        for hook in self.residual_hooks:
            r, h = hook(i, r, h, t)
        return h + r

    def mid(self, h, t):
        return self.block(self.num_skips, self.uvit.mid_block, h, t)

    def encode(self, x, t, class_labels=None, upto: Optional[int] = None):
        """Tokens, then in blocks 0..upto (all when None). Returns (h, skips shallow-first)."""
        h = self.uvit.tokens(x, t, class_labels)
        skips = []
        for b, blk in enumerate(self.uvit.in_blocks[: None if upto is None else upto + 1]):
            h = self.block(b, blk, h, t)
            skips.append(h)
        return h, skips

    def decode_range(self, h, skips, t, start: int, stop: int):
        """Out blocks start..stop-1; `skips` is shallow-first (skips[m] = h_m)."""
        k = self.num_skips - 1
        for i in range(start, stop):
            d = skips[k - i]
            for hook in self.skip_hooks:
                d, h = hook(i, d, h, t)
            h = self.block(self.num_skips + 1 + i, self.uvit.out_blocks[i], h, t, d)
        return h

    def forward(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        tb = batch_timesteps(x, t)
        h, skips = self.encode(x, tb, class_labels)
        h = self.mid(h, tb)
        return self.uvit.head(self.decode_range(h, skips, tb, 0, self.num_skips))

    def forward_full(self, x: torch.Tensor, t, branch: int, class_labels=None):
        k = self.num_skips - 1
        tb = batch_timesteps(x, t)
        h, skips = self.encode(x, tb, class_labels)
        h = self.mid(h, tb)
        h = self.decode_range(h, skips, tb, 0, k - branch)
        cache = (h,)
        h = self.decode_range(h, skips, tb, k - branch, k + 1)
        return self.uvit.head(h), cache

    def forward_partial(self, x: torch.Tensor, t, cache, branch: int, class_labels=None):
        k = self.num_skips - 1
        tb = batch_timesteps(x, t)
        _, skips = self.encode(x, tb, class_labels, upto=branch)
        return self.uvit.head(self.decode_range(cache[0], skips, tb, k - branch, k + 1))
