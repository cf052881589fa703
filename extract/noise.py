"""Seeded noise: epsilon for (seed, split, image id, t) is a pure function of those four (and of the draw, for K draws).

Each image draws from its own CPU generator whose seed is a hash of the triple, so the same
image gets the same noise whatever batch, worker, device or order it comes in; a cache is then
reproducible bit for bit and can be resumed or extended shard by shard.

The split is part of the key because an image id is a position in its split's index: without it,
train image k and test image k drew the same noise, and with class-sorted subsets of equal size
they are also the same class, so a probe could match a test image to its train twin by its noise
(a random-weight backbone scored 91% on CIFAR-10 that way). ``split=""`` keeps the key of caches
written before (cache spec ``noise_key="index"``), for reading them only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["noise_seed_for", "seeded_noise"]


def noise_seed_for(seed: int, image_id: int, t: int, draw: int = 0, split: str = "") -> int:
    """A 63-bit generator seed derived from (seed, image id, t) by BLAKE2b; draw k > 0 of ``--noise-draws`` adds k,
    a split name adds ``split`` (every cache since ``noise_key="split+index"``)."""
    key = (f"diffrep-noise:{int(seed)}:{int(image_id)}:{int(t)}" + (f":{int(draw)}" if draw else "")
           + (f":split={split}" if split else ""))
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_noise(
    seed: int, image_ids: Sequence[int], t: int | Sequence[int], shape: tuple[int, ...], draw: int = 0,
    split: str = "",
) -> torch.Tensor:
    """Standard normal noise, one independent draw per image.

    Args:
        seed: the run's noise seed. image_ids: the images' global indices in the dataset.
        t: one timestep for all, or one per image. shape: per-image shape, e.g. (3, 256, 256).
        draw: which of ``--noise-draws`` independent draws (0: the one every cache has).
        split: the images' split (``train``, ``test``): ids of two splits then never share noise.

    Returns:
        (len(image_ids), *shape) float32 on the CPU.
    """
    ts = [int(t)] * len(image_ids) if isinstance(t, int) else [int(v) for v in t]
    out = torch.empty((len(image_ids), *shape), dtype=torch.float32)
    generator = torch.Generator(device="cpu")
    for row, (image_id, step) in enumerate(zip(image_ids, ts)):
        generator.manual_seed(noise_seed_for(seed, image_id, step, draw, split))
        out[row] = torch.randn(shape, generator=generator)
    return out
