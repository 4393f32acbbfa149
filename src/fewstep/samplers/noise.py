"""Per-sample noise: sample i draws from its own generator seeded from (seed, i).

Sample i therefore sees the same initial noise and the same ancestral-step noise
whatever batch, batch order or process it is placed in; its output agrees across
batch sizes up to the float round-off of batched kernels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for sample `index` of a run with base `seed` (numpy SeedSequence). stream > 0 names an
    independent family of streams for another use of the same indices (stream 0 is the samplers')."""
    key = [int(seed), int(index)] + ([int(stream)] if stream else [])
    return int(np.random.SeedSequence(key).generate_state(2, dtype=np.uint64)[0] >> 1)


class SampleNoise:
    """Draws N(0, I) noise of a per-sample shape for a batch of sample indices.

    ``noise()`` returns a (B, *shape) tensor, row b from the generator of index[b];
    successive calls continue each sample's own stream.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device="cpu",
                 dtype=torch.float32, stream: int = 0):
        self.indices = list(int(i) for i in indices)
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i, stream)) for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __call__(self) -> torch.Tensor:
        z = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return z.to(device=self.device, dtype=self.dtype)
