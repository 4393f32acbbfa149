"""DiT (Peebles & Xie, ICCV 2023, arXiv 2212.09748) as diffusers' `DiTTransformer2DModel`, walked block by block.

The network (pixel or latent space alike) is

    tokens   h = PatchEmbed(x)                         p x p patches + fixed 2D sin-cos position embedding
    blocks   B_0 .. B_{L-1}, each adaLN-Zero:          c_b = emb_b(t, y)  (every diffusers block has its own
                                                       CombinedTimestepLabelEmbeddings)
             h <- h + g_msa(c_b) * Attn(LN(h) (1 + s_msa) + b_msa)          residual branch 2b   ("attn")
             h <- h + g_mlp(c_b) * MLP(LN(h) (1 + s_mlp) + b_mlp)           residual branch 2b+1 ("mlp")
    head     adaLN (conditioning of block 0's embedding), linear to p^2 C_out per token, unpatchify.

A DiT has no long skips: its identity paths are the residual additions. `DiTAdapter` runs exactly the
operations of `DiTTransformer2DModel.forward` in the same order (the output is bit-identical), and exposes

* residual hooks ``hook(i, r, h, t) -> (r, h)``, called with residual branch i = 2b (attention) or 2b + 1
  (MLP) of block b after the adaLN-Zero gate and before ``h <- r + h``; `t` is the (B,) timesteps. They have
  the signature of the skip hooks of `UNetAdapter` (r plays d, the stream h plays u), so `ScaleSkips`,
  `CondRowsOnly` and the skip-norm recorder act on them unchanged (strategies/residual.py: skip=residual);
* block-cache forwards (strategies/block_cache.py: cache=block): `forward_block_full(x, t, blocks)` also
  returns what the middle blocks B_m .. B_{L-n-1} add to the stream, `forward_block_partial(x, t, cache,
  blocks)` recomputes B_0 .. B_{m-1} and B_{L-n} .. B_{L-1} around it (blocks = (m, n)).

Class labels: DiT is always class-conditional. `num_embeds_ada_norm` is its number of classes C; diffusers'
LabelEmbedding (class_dropout_prob 0.1 > 0) has C + 1 rows, the last (label C) being the null class that
classifier-free guidance feeds the unconditional row, as DiTPipeline does (class_null = 1000 for ImageNet).
diffusers drops labels at random in train mode, independently in each block's embedding; fewstep's training
drops them once per example (task.label_dropout), so `new_dit` switches that built-in dropout off.

Learned sigma: with out_channels = 2 C the adapter returns all 2 C channels, as the network does; the
denoiser keeps the first C (the eps half), exactly as DiTPipeline splits `noise_pred`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

BRANCH_KINDS = ("attn", "mlp")


def check_dit_config(sample_size: int, in_channels: int, out_channels, patch_size: int, num_layers: int,
                     num_attention_heads: int, attention_head_dim: int, num_embeds_ada_norm) -> None:
    """One ValueError line per impossible DiT shape, before anything is built."""
    if patch_size < 1 or sample_size % patch_size:
        raise ValueError(f"DiT patch_size={patch_size} must divide the image size {sample_size}")
    if num_layers < 1 or num_attention_heads < 1 or attention_head_dim < 1:
        raise ValueError(f"DiT num_layers, num_attention_heads and attention_head_dim must be >= 1 "
                         f"(got {num_layers}, {num_attention_heads}, {attention_head_dim})")
    if out_channels is not None and out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"DiT out_channels must be in_channels ({in_channels}: eps) or twice it "
                         f"({2 * in_channels}: eps and learned sigma), got {out_channels}")
    if not num_embeds_ada_norm or num_embeds_ada_norm < 1:
        raise ValueError(f"DiT num_embeds_ada_norm is its number of classes and must be >= 1 "
                         f"(got {num_embeds_ada_norm})")


def dit_class_embeds(config) -> Optional[int]:
    """Class embeddings of a DiT config: its classes (num_embeds_ada_norm) + the null class."""
    n = (config or {}).get("num_embeds_ada_norm", None)
    return int(n) + 1 if n else None


def no_builtin_label_dropout(dit):
    """Switch off diffusers' per-block random label dropout (train mode only; the table keeps its null row):
    fewstep's training drops labels itself, once per example. Returns the network."""
    from diffusers.models.embeddings import LabelEmbedding

    for m in dit.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    return dit


@dataclass
class ResidualInfo:
    """Static description of one residual branch of a transformer block."""

    depth: int     # i: branch index in execution order (2b attention, 2b + 1 MLP for a DiT)
    block: int     # b: the block, 0 = first (next to the patch embedding)
    kind: str      # "attn" | "mlp"
    level: int     # = block (what the skip-norm table and plot group by)


def residual_infos(num_blocks: int) -> List[ResidualInfo]:
    return [ResidualInfo(depth=2 * b + j, block=b, kind=k, level=b)
            for b in range(num_blocks) for j, k in enumerate(BRANCH_KINDS)]


def check_blocks(blocks, num_blocks: int) -> Tuple[int, int]:
    """(first, last) recomputed blocks of a block-cache partial call; the middle must keep >= 1 block."""
    first, last = (int(v) for v in blocks)
    if first < 0 or last < 0 or first + last > num_blocks - 1:
        raise ValueError(f"cache.first + cache.last must leave at least one middle block to cache: "
                         f"0 <= first + last <= {num_blocks - 1} for this network of {num_blocks} blocks "
                         f"(got first={first}, last={last})")
    return first, last


class DiTAdapter(nn.Module):
    """Layer-by-layer view of a diffusers `DiTTransformer2DModel`: residual hooks and block-cache forwards."""

    def __init__(self, dit):
        super().__init__()
        for b, blk in enumerate(dit.transformer_blocks):
            if blk.norm_type != "ada_norm_zero" or blk.attn2 is not None or blk.pos_embed is not None:
                raise ValueError(f"DiT block {b} is not a plain adaLN-Zero self-attention block "
                                 f"(norm_type={blk.norm_type}); only DiTTransformer2DModel's blocks are supported")
        self.dit = dit
        self.residual_hooks: list = []
        self.num_blocks = len(dit.transformer_blocks)
        self.residuals = residual_infos(self.num_blocks)

    @property
    def config(self):
        return self.dit.config

    @property
    def dtype(self):
        return self.dit.dtype

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def timesteps(x: torch.Tensor, t) -> torch.Tensor:
        """A number, a 0-dim, (1,) or (B,) tensor -> (B,) timesteps (dtype kept, as DiTPipeline expands them)."""
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1)
        return t.expand(x.shape[0]) if t.numel() == 1 else t

    def _labels(self, class_labels):
        if class_labels is None:
            raise ValueError("a DiT is class-conditional: pass class_labels (label num_embeds_ada_norm = the null class)")
        return class_labels

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.dit.pos_embed(x)

    def _residual(self, i: int, r: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for hook in self.residual_hooks:
            r, h = hook(i, r, h, t)
        return r + h

    def block(self, b: int, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Block b, as BasicTransformerBlock.forward with norm_type ada_norm_zero, hooks between gate and add."""
        blk = self.dit.transformer_blocks[b]
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.norm1(h, t, y, hidden_dtype=h.dtype)
        attn = blk.attn1(norm_h, encoder_hidden_states=None, attention_mask=None)
        attn = gate_msa.unsqueeze(1) * attn
        h = self._residual(2 * b, attn, h, t)
        if h.ndim == 4:
            h = h.squeeze(1)
        norm_h = blk.norm3(h)
        norm_h = norm_h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        if blk._chunk_size is not None:
            from diffusers.models.attention import _chunked_feed_forward

            ff = _chunked_feed_forward(blk.ff, norm_h, blk._chunk_dim, blk._chunk_size)
        else:
            ff = blk.ff(norm_h)
        ff = gate_mlp.unsqueeze(1) * ff
        h = self._residual(2 * b + 1, ff, h, t)
        if h.ndim == 4:
            h = h.squeeze(1)
        return h

    def run_blocks(self, h, t, y, start: int, stop: int) -> torch.Tensor:
        for b in range(start, stop):
            h = self.block(b, h, t, y)
        return h

    def head(self, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Final adaLN (block 0's embedding, as diffusers), linear, unpatchify."""
        dit = self.dit
        conditioning = dit.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
        shift, scale = dit.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        h = dit.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        h = dit.proj_out_2(h)
        p, c = dit.patch_size, dit.out_channels
        g = int(h.shape[1] ** 0.5)
        h = h.reshape(shape=(-1, g, g, p, p, c))
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(shape=(-1, c, g * p, g * p))

    # ------------------------------------------------------------------ forwards
    def forward(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """= DiTTransformer2DModel.forward(x, t, class_labels).sample (all out_channels)."""
        tb, y = self.timesteps(x, t), self._labels(class_labels)
        h = self.run_blocks(self.tokens(x), tb, y, 0, self.num_blocks)
        return self.head(h, tb, y)

    def forward_block_full(self, x: torch.Tensor, t, blocks, class_labels=None):
        """Full forward that also returns the cache (delta,): delta = h after B_{L-n-1} - h before B_m."""
        m, n = check_blocks(blocks, self.num_blocks)
        tb, y = self.timesteps(x, t), self._labels(class_labels)
        h = self.run_blocks(self.tokens(x), tb, y, 0, m)
        h_in = h
        h = self.run_blocks(h, tb, y, m, self.num_blocks - n)
        delta = h - h_in
        h = self.run_blocks(h, tb, y, self.num_blocks - n, self.num_blocks)
        return self.head(h, tb, y), (delta,)

    def forward_block_partial(self, x: torch.Tensor, t, cache, blocks, class_labels=None) -> torch.Tensor:
        """B_0 .. B_{m-1}, + the cached middle residual, then B_{L-n} .. B_{L-1} and the head."""
        m, n = check_blocks(blocks, self.num_blocks)
        tb, y = self.timesteps(x, t), self._labels(class_labels)
        h = self.run_blocks(self.tokens(x), tb, y, 0, m)
        h = h + cache[0]
        h = self.run_blocks(h, tb, y, self.num_blocks - n, self.num_blocks)
        return self.head(h, tb, y)
