"""Seeded noise: epsilon for (seed, image id, t) is a pure function of those three (and of the draw, for K draws).

Each image draws from its own CPU generator whose seed is a hash of the triple, so the same
image gets the same noise whatever batch, worker, device or order it comes in; a cache is then
reproducible bit for bit and can be resumed or extended shard by shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["noise_seed_for", "seeded_noise"]


def noise_seed_for(seed: int, image_id: int, t: int, draw: int = 0) -> int:
    """A 63-bit generator seed derived from (seed, image id, t) by BLAKE2b; draw k > 0 of ``--noise-draws`` adds k."""
    key = f"diffrep-noise:{int(seed)}:{int(image_id)}:{int(t)}" + (f":{int(draw)}" if draw else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_noise(
    seed: int, image_ids: Sequence[int], t: int | Sequence[int], shape: tuple[int, ...], draw: int = 0
) -> torch.Tensor:
    """Standard normal noise, one independent draw per image.

    Args:
        seed: the run's noise seed. image_ids: the images' global indices in the dataset.
        t: one timestep for all, or one per image. shape: per-image shape, e.g. (3, 256, 256).
        draw: which of ``--noise-draws`` independent draws (0: the one every cache has).

    Returns:
        (len(image_ids), *shape) float32 on the CPU.
    """
    ts = [int(t)] * len(image_ids) if isinstance(t, int) else [int(v) for v in t]
    out = torch.empty((len(image_ids), *shape), dtype=torch.float32)
    generator = torch.Generator(device="cpu")
    for row, (image_id, step) in enumerate(zip(image_ids, ts)):
        generator.manual_seed(noise_seed_for(seed, image_id, step, draw))
        out[row] = torch.randn(shape, generator=generator)
    return out
