"""``diffrep segment --live``: block maps from the live backbone every step, image and label augmented together.

The official protocol for completeness, as ``probe --live`` is for classification: each training batch is
decoded, given one random resized crop (area 0.8-1.0) and flip that its image (bilinear) and its label map
(nearest) share, noised with fresh noise, and run through the one noisy forward (``extract.forward``)
truncated after the deepest block, maps kept unpooled. Scoring reads the test images unaugmented with the
cache's seeded noise, so its maps equal an unpooled cache's. Same ``batches``/``ranges``/``read`` as a
``probe.dense_train.DenseSource``, so the same loop trains and scores it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from extract.forward import block_features, diffuse, noisy_input
from extract.inputs.images import load_pixels
from extract.schedule import NoiseSchedule
from probe.train import epoch_order

__all__ = ["LiveDenseSource", "joint_crop_flip"]


def joint_crop_flip(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                    scale: tuple[float, float] = (0.8, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """One random square crop (area share in ``scale``) resized back, and a coin-flip mirror, per image, shared by its label.

    Args:
        images: ``(n, 3, S, S)`` float. labels: ``(n, S, S)`` int64 (nearest keeps class ids whole).
    """
    n, _, size, _ = images.shape
    out_images, out_labels = torch.empty_like(images), torch.empty_like(labels)
    shares = torch.empty(n).uniform_(*scale, generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    for i in range(n):
        side = max(1, int(round(size * float(shares[i]) ** 0.5)))
        top = int(torch.randint(0, size - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - side + 1, (1,), generator=generator))
        image = images[i:i + 1, :, top:top + side, left:left + side]
        label = labels[i:i + 1, None, top:top + side, left:left + side].float()
        if side != size:
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
            label = F.interpolate(label, size=(size, size), mode="nearest")
        if flips[i]:
            image, label = image.flip(-1), label.flip(-1)
        out_images[i], out_labels[i] = image[0], label[0, 0].long()
    return out_images, out_labels


class LiveDenseSource:
    """A split's images through the live backbone (see the module docstring).

    Args:
        model: the frozen backbone (on ``device``). paths: image files, row order. labels: ``labels(start, stop)``
        -> ``(n, S, S)`` uint8 at the input square. blocks, timesteps: the maps. schedule: the backbone's.
        size: input side. noise_seed: the seeded noise of scoring. augment, fresh_noise: the training views.
        noise_split: the split the seeded noise is keyed on, as the extract job keys that split's cache.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], labels: Callable[[int, int], np.ndarray] | None,
                 blocks: Sequence[int], timesteps: Sequence[int], schedule: NoiseSchedule, size: int,
                 device: torch.device, noise_seed: int = 0, augment: bool = True, fresh_noise: bool = True,
                 noise_split: str = ""):
        self.model, self.paths, self.labels = model, list(paths), labels
        self.blocks, self.timesteps = sorted(blocks), sorted(timesteps)
        self.schedule, self.size, self.device = schedule, int(size), device
        self.noise_seed, self.augment, self.fresh_noise = noise_seed, augment, fresh_noise
        self.noise_split = noise_split  # the split the cache's seeded noise is keyed on (extract.noise)
        self.num_rows = len(self.paths)
        self.valid = None

    def ranges(self, batch_size: int, seed: int | None, epoch: int) -> list[tuple[int, int]]:
        bounds = [(lo, min(lo + batch_size, self.num_rows)) for lo in range(0, self.num_rows, batch_size)]
        return bounds if seed is None else [bounds[i] for i in epoch_order(len(bounds), seed, epoch).tolist()]

    def _pixels(self, start: int, stop: int) -> torch.Tensor:
        pixels = np.stack([load_pixels(self.paths[r], self.size) for r in range(start, stop)])
        return torch.from_numpy(pixels).float() / 127.5 - 1.0

    @torch.no_grad()
    def _maps(self, x0: torch.Tensor, ids: list[int], generator: torch.Generator | None) -> dict:
        out = {}
        x0 = x0.to(self.device)
        for t in self.timesteps:
            if generator is not None:
                x_t = diffuse(x0, t, torch.randn(x0.shape, generator=generator), self.schedule)
            else:
                x_t = noisy_input(x0, t, ids, self.noise_seed, self.schedule, split=self.noise_split)
            maps = block_features(self.model, x_t, t, self.blocks, pool=0)
            out.update({(b, t): maps[b] for b in self.blocks})
        return out

    def read(self, start: int, stop: int) -> dict:
        """Scoring: the images as they are, with the cache's seeded noise (image id = row)."""
        return self._maps(self._pixels(start, stop), list(range(start, stop)), None)

    def batches(self, batch_size: int, seed: int | None, epoch: int) -> Iterator[tuple[dict, torch.Tensor]]:
        for number, (start, stop) in enumerate(self.ranges(batch_size, seed, epoch)):
            generator = torch.Generator().manual_seed(((seed or 0) * 1_000_003 + epoch) * 100_003 + number)
            images = self._pixels(start, stop)
            labels = torch.from_numpy(self.labels(start, stop).astype(np.int64))
            if self.augment:
                images, labels = joint_crop_flip(images, labels, generator)
            yield self._maps(images, list(range(start, stop)), generator if self.fresh_noise else None), labels
