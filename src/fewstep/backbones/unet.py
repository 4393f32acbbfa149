"""diffusers UNet2DModel re-expressed as an explicit walk over its layers.

`UNet2DModel.forward` runs its down and up blocks as black boxes. To scale skips
(Skip-Tuning, FreeU), read them (the skip-norm diagnostic) or stop half way
(DeepCache) we need the walk itself, so this adapter flattens the network into

    encoder layers  E_0 .. E_k   each produces one skip tensor d_m (the res_samples):
                                 E_0 = conv_in, then every resnet(+attention) and every
                                 downsampler of the down blocks, shallow to deep;
    mid block;
    decoder layers  D_0 .. D_k   each consumes one skip: D_j concatenates the decoder
                                 feature u with d_{k-j} and runs a resnet(+attention);
                                 the last layer of an up block also runs its upsampler.

Skip numbering used by every strategy: depth index i = j = k - m, so i = 0 is the
deepest skip (consumed first by the decoder, next to the bottleneck) and i = k the
shallowest (conv_in's output, consumed last). With no hook installed the walk runs
exactly the operations of `UNet2DModel.forward`, in the same order.

Skip hooks: callables ``hook(i, d, u, t) -> (d, u)`` called right before decoder
layer i concatenates u and d; `t` is the batch of (float) timesteps. They are how
Skip-Tuning, FreeU and the skip-norm diagnostic act; the adapter knows none of them.

Partial forwards (DeepCache): `forward_full(x, t, branch)` also returns the decoder
state entering the layer that consumes skip m = branch; `forward_partial(x, t, cache,
branch)` runs only E_0..E_m, then D_{k-m}..D_k from the cached state, then conv_out.
Both have static control flow for a fixed branch, so each can be torch.compile'd.

The condition of a call (``**cond``: class_labels here) goes to `embed`, which returns the call's context
`ctx`; the walk hands ctx to the layers through four small methods (`_temb`, `_attend`, `_mid`, `head`),
so an adapter of another UNet class with the same block structure (backbones/sd_unet.py:
UNet2DConditionModel, whose attentions also read the text embedding) overrides only those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

SkipHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple]


@dataclass
class SkipInfo:
    """Static description of one skip connection."""

    depth: int          # i: 0 = deepest
    index: int          # m: position in res_samples, 0 = conv_in output
    level: int          # resolution level counted from the bottom: 0 = lowest resolution
    channels: int
    up_block: int       # which up block consumes it (0 = the first, lowest-resolution one)
    up_layer: int       # which resnet inside that up block


def _is_resnet(module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D
    return isinstance(module, ResnetBlock2D)


class UNetAdapter(nn.Module):
    """Layer-by-layer view of a diffusers `UNet2DModel` with skip hooks and partial forwards."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.skip_hooks: List[SkipHook] = []
        self._build_plan()

    # ------------------------------------------------------------------ structure
    def _build_plan(self):
        u = self.unet
        enc = [("conv_in", None, None)]
        levels = [0]  # resolution level of each skip, counted from the top (0 = input res)
        chans = [u.conv_in.out_channels]
        lvl = 0
        for b, blk in enumerate(u.down_blocks):
            attns = getattr(blk, "attentions", None)
            skip_type = hasattr(blk, "skip_conv")
            per_layer_attn = attns is not None and len(attns) == len(blk.resnets)
            for j in range(len(blk.resnets)):
                enc.append(("down_resnet", b, j if per_layer_attn else None))
                levels.append(lvl)
                chans.append(blk.resnets[j].out_channels)
            if getattr(blk, "downsamplers", None) is not None:
                enc.append(("down_skip" if skip_type else "downsample", b, None))
                lvl += 1
                levels.append(lvl)
                chans.append(chans[-1])
        self.enc_plan = enc
        k = len(enc) - 1
        self.num_skips = k + 1
        dec = []
        for b, blk in enumerate(u.up_blocks):
            n = len(blk.resnets)
            for j in range(n):
                dec.append((b, j, j == n - 1))
        if len(dec) != len(enc):
            raise ValueError(f"UNet has {len(enc)} skip tensors but {len(dec)} decoder layers consume them")
        self.dec_plan = dec
        depth_of_level = {lv: max(levels) - lv for lv in set(levels)}
        self.skips = [
            SkipInfo(depth=i, index=k - i, level=depth_of_level[levels[k - i]], channels=chans[k - i],
                     up_block=dec[i][0], up_layer=dec[i][1])
            for i in range(k + 1)
        ]
        self.num_levels = max(levels) + 1

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    # ------------------------------------------------------------------ pieces
    def embed(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        u = self.unet
        timesteps = t
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=x.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(x.device)
        timesteps = timesteps * torch.ones(x.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = u.time_embedding(u.time_proj(timesteps).to(dtype=u.dtype))
        if u.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels")
            if u.config.class_embed_type == "timestep":
                class_labels = u.time_proj(class_labels)
            emb = emb + u.class_embedding(class_labels).to(dtype=u.dtype)
        return emb

    def _enc_layer(self, n: int, h, emb, skip_sample):
        kind, b, j = self.enc_plan[n]
        u = self.unet
        if kind == "conv_in":
            return u.conv_in(h), skip_sample
        blk = u.down_blocks[b]
        if kind == "down_resnet":
            jj = n - self._first_enc_of_block(b)
            h = blk.resnets[jj](h, self._temb(emb))
            if j is not None:
                h = self._attend(blk.attentions[jj], h, emb)
            return h, skip_sample
        if kind == "downsample":
            for ds in blk.downsamplers:
                h = ds(h, temb=self._temb(emb)) if _is_resnet(ds) else ds(h)
            return h, skip_sample
        if kind == "down_skip":  # SkipDownBlock2D / AttnSkipDownBlock2D
            h = blk.resnet_down(h, self._temb(emb))
            for ds in blk.downsamplers:
                skip_sample = ds(skip_sample)
            return blk.skip_conv(skip_sample) + h, skip_sample
        raise AssertionError(kind)

    def _first_enc_of_block(self, b: int) -> int:
        for n, (kind, bb, _) in enumerate(self.enc_plan):
            if bb == b:
                return n
        raise AssertionError(b)

    def encode(self, x: torch.Tensor, emb: torch.Tensor, upto: Optional[int] = None):
        """Run E_0..E_upto (all when None). Returns (h, skips shallow-first, skip_sample)."""
        if self.unet.config.center_input_sample:
            x = 2 * x - 1.0
        skip_sample = x
        h = x
        skips = []
        last = self.num_skips - 1 if upto is None else upto
        for n in range(last + 1):
            h, skip_sample = self._enc_layer(n, h, emb, skip_sample)
            skips.append(h)
        return h, skips, skip_sample

    def _dec_layer(self, i: int, h, d, emb, t, skip_up):
        b, j, last = self.dec_plan[i]
        blk = self.unet.up_blocks[b]
        for hook in self.skip_hooks:
            d, h = hook(i, d, h, t)
        h = torch.cat([h, d], dim=1)
        h = blk.resnets[j](h, self._temb(emb))
        attns = getattr(blk, "attentions", None)
        skip_type = hasattr(blk, "skip_conv")
        if attns is not None and len(attns) == len(blk.resnets):
            h = self._attend(attns[j], h, emb)
        if last:
            if skip_type:  # SkipUpBlock2D / AttnSkipUpBlock2D
                if attns is not None and len(attns) == 1:
                    h = attns[0](h)
                skip_up = blk.upsampler(skip_up) if skip_up is not None else 0
                if blk.resnet_up is not None:
                    s = blk.skip_conv(blk.act(blk.skip_norm(h)))
                    skip_up = skip_up + s
                    h = blk.resnet_up(h, self._temb(emb))
            elif getattr(blk, "upsamplers", None) is not None:
                for us in blk.upsamplers:
                    h = us(h, temb=self._temb(emb)) if _is_resnet(us) else us(h)
        return h, skip_up

    def decode(self, h, skips: Sequence[torch.Tensor], emb, t, skip_up=None):
        """Run every decoder layer D_0..D_k."""
        return self.decode_range(h, skips, emb, t, 0, self.num_skips, skip_up)

    def head(self, h, skip_up, t_batch):
        u = self.unet
        out = u.conv_out(u.conv_act(u.conv_norm_out(h)))
        if skip_up is not None and not isinstance(skip_up, int):
            out = out + skip_up
        if u.config.time_embedding_type == "fourier":
            out = out / t_batch.reshape((out.shape[0],) + (1,) * (out.ndim - 1))
        return out

    def _t_batch(self, x, t):
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x.device)
        if t.ndim == 0:
            t = t[None]
        return t.to(x.device) * torch.ones(x.shape[0], dtype=t.dtype, device=x.device)

    # ------------------------------------------------------------------ context
    # what the layers take from the call's context (embed's result): UNet2DModel's is the time(+class)
    # embedding itself, its attentions are self-attentions and its mid block takes the embedding only
    def _temb(self, ctx):
        return ctx

    def _attend(self, attn, h, ctx):
        return attn(h)

    def _mid(self, h, ctx):
        return self.unet.mid_block(h, ctx) if self.unet.mid_block is not None else h

    # ------------------------------------------------------------------ forwards
    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        tb = self._t_batch(x, t)
        emb = self.embed(x, t, **cond)
        h, skips, _ = self.encode(x, emb)
        h = self._mid(h, emb)
        h, skip_up = self.decode(h, skips, emb, tb)
        return self.head(h, skip_up, tb)

    def forward_full(self, x: torch.Tensor, t, branch: int, **cond):
        """Full forward that also returns the cache: the decoder state (u, skip_up)
        entering D_{k-branch}, the layer that consumes skip m = branch."""
        k = self.num_skips - 1
        start = k - branch
        tb = self._t_batch(x, t)
        emb = self.embed(x, t, **cond)
        h, skips, _ = self.encode(x, emb)
        h = self._mid(h, emb)
        h, skip_up = self.decode_range(h, skips, emb, tb, 0, start)
        cache = (h, skip_up)
        h, skip_up = self.decode_range(h, skips, emb, tb, start, k + 1, skip_up)
        return self.head(h, skip_up, tb), cache

    def forward_partial(self, x: torch.Tensor, t, cache, branch: int, **cond):
        """Shallow path only: E_0..E_branch, then D_{k-branch}..D_k from the cached state."""
        k = self.num_skips - 1
        tb = self._t_batch(x, t)
        emb = self.embed(x, t, **cond)
        _, skips, _ = self.encode(x, emb, upto=branch)
        h, skip_up = cache
        h, skip_up = self.decode_range(h, skips, emb, tb, k - branch, k + 1, skip_up)
        return self.head(h, skip_up, tb)

    def decode_range(self, h, skips, emb, t, start: int, stop: int, skip_up=None):
        """Run D_start..D_{stop-1}; `skips` is shallow-first (skips[m] = d_m)."""
        k = self.num_skips - 1
        for i in range(start, stop):
            h, skip_up = self._dec_layer(i, h, skips[k - i], emb, t, skip_up)
        return h, skip_up
