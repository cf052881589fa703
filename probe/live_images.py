"""Images as training batches for the live-backbone path (DifFeed, live probing): decoded ahead, noised per step.

``LiveImages`` is a ``probe.train.BatchSource``: every epoch it yields ``({(0, t): x_t for t}, labels)``
for every image once, in a class-mixed order that is a pure function of (seed, epoch), so
``probe.train.fit`` trains, checkpoints and resumes on it as on cached features. Batches are
decoded by a pool of threads on a background thread, a few batches ahead of the forward.

The noise of image i at timestep t is the extract stage's seeded noise, a pure function of
(noise seed, image id, t) — the same x_t the cache holds — unless ``fresh_noise``, when every step
draws new noise from (seed, epoch, batch), as the official training does. ``augment`` adds the
official random resized crop (scale 0.8-1.0) and horizontal flip (one view per image, shared by
its timesteps). ``cached`` adds features read from the cache beside the images (DifFeed's pass 1),
as ``{(b, t): rows}``; they are only valid for the view and noise the cache holds, so they cannot
be combined with ``augment`` or ``fresh_noise``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from extract import distributed
from extract.forward import diffuse, noisy_input
from extract.noise import seeded_noise
from extract.inputs.images import load_batch
from extract.schedule import NoiseSchedule
from probe.errors import ProbeError
from extract.inputs.read_ahead import read_ahead
from probe.train import epoch_order

__all__ = ["LiveImages", "LIVE_KEY_BLOCK", "NOISE_KEY_BLOCK"]

#: The "block" of the images themselves in a live batch's feature dict: ``{(0, t): x_t}``.
LIVE_KEY_BLOCK = 0
#: key block of a latent family's noise in a batch (its x_t is made on the device, after the encoder)
NOISE_KEY_BLOCK = -1


def _crop_params(n: int, size: int, generator: torch.Generator, scale=(0.8, 1.0)) -> list[tuple[int, int, int]]:
    """(side, top, left) of a square crop of a random area share in ``scale`` at a random place, per image.

    Drawn for every row of a global batch, so a rank that decodes only its share crops its rows as one
    process would.
    """
    shares = torch.empty(n).uniform_(*scale, generator=generator)
    params = []
    for i in range(n):
        side = max(1, int(round(size * float(shares[i]) ** 0.5)))
        top = int(torch.randint(0, size - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - side + 1, (1,), generator=generator))
        params.append((side, top, left))
    return params


def _random_resized_crop(images: torch.Tensor, params: list[tuple[int, int, int]]) -> torch.Tensor:
    """Each image cropped to its (side, top, left) and resized back (bilinear)."""
    n, _, size, _ = images.shape
    out = torch.empty_like(images)
    for i, (side, top, left) in enumerate(params):
        crop = images[i:i + 1, :, top:top + side, left:left + side]
        out[i:i + 1] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False) if side != size else crop
    return out


class LiveImages:
    """A split's images as noisy-image batches at one or more timesteps (see the module docstring).

    Args:
        paths, labels: the split's image files and int labels.
        image_size: model resolution. timesteps: one t or several. schedule: the backbone's noise schedule.
        noise_seed: seed of the seeded noise. image_ids: each image's id in the seeded noise (the
            extract stage's; default 0..N-1). fresh_noise: new noise every step instead.
        augment: random resized crop (0.8-1.0) and flip every step. decode_threads: decoding threads.
        cached: ``{(b, t): (N, C, h, w) tensor}`` rows aligned with ``paths``, yielded beside x_t.
        latent_shape: for a latent family (SD), the (C, h, w) of its x0: the batch then holds the clean
            images at ``(0, t)`` and the noise at ``(NOISE_KEY_BLOCK, t)`` (the same seeded noise as the
            extract job's), and the live head encodes and noises them on its device.
        noise_split: the split the seeded noise is keyed on (``extract.noise``), as the extract job keys
            a cache of this split; '' only to match a cache written before the split was in the key.
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, image_size: int, timesteps: int | Sequence[int],
                 schedule: NoiseSchedule, noise_seed: int = 0, fresh_noise: bool = False, augment: bool = False,
                 decode_threads: int = 2, prefetch: int = 3, image_ids: Sequence[int] | None = None,
                 cached: Mapping[tuple[int, int], torch.Tensor] | None = None,
                 latent_shape: tuple[int, int, int] | None = None, noise_split: str = ""):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int64)
        self.timesteps = [int(timesteps)] if isinstance(timesteps, (int, np.integer)) else [int(t) for t in timesteps]
        self.image_size, self.schedule = image_size, schedule
        self.noise_seed, self.fresh_noise, self.augment = noise_seed, fresh_noise, augment
        self.decode_threads, self.prefetch = decode_threads, prefetch
        self.num_images = len(self.paths)
        self.image_ids = np.arange(self.num_images) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
        self.cached = dict(cached or {})
        self.latent_shape = tuple(latent_shape) if latent_shape else None
        self.noise_split = noise_split
        if len(self.image_ids) != self.num_images or len(self.labels) != self.num_images:
            raise ProbeError(f"{self.num_images} images but {len(self.labels)} labels and {len(self.image_ids)} ids")
        if self.cached and (augment or fresh_noise):
            raise ProbeError("cached features hold one view and one noise draw: they cannot be used with "
                             "augmentation or fresh noise (run pass 1 live instead)")
        schedule.check_timesteps(self.timesteps)

    @property
    def t(self) -> int:
        """The timestep of a one-timestep source."""
        return self.timesteps[0]

    def _batch(self, rows: np.ndarray, seed: int | None, epoch: int, number: int, part: slice = slice(None)):
        """Batch ``number`` of the epoch: ``rows`` are the global batch, ``part`` the share this rank decodes.

        Every random draw (crops, flips, fresh noise) is made for the whole global batch and indexed by
        position, so the rows a rank yields are those one process yields for them.
        """
        generator = torch.Generator().manual_seed(((seed or 0) * 1_000_003 + epoch) * 100_003 + number)
        n = len(rows)
        crops = _crop_params(n, self.image_size, generator) if self.augment else None
        flips = torch.rand(n, generator=generator) < 0.5 if self.augment else None
        noise_shape = (n, *self.latent_shape) if self.latent_shape is not None else (n, 3, self.image_size, self.image_size)
        noise = [torch.randn(noise_shape, generator=generator) for _ in self.timesteps] if self.fresh_noise else None
        position = np.arange(n)[part]
        images, ok, _ = load_batch([self.paths[r] for r in rows[part]], self.image_size, num_threads=self.decode_threads)
        images, position = images[torch.from_numpy(ok)], position[ok]
        rows = rows[position]
        if self.augment:
            images = _random_resized_crop(images, [crops[p] for p in position])
            chosen = flips[torch.from_numpy(position)]
            images = torch.where(chosen[:, None, None, None], images.flip(-1), images)
        batch = {}
        for i, t in enumerate(self.timesteps):
            if self.latent_shape is not None:  # a latent family: x_t is made on the device, after its encoder
                batch[(LIVE_KEY_BLOCK, t)] = images
                batch[(NOISE_KEY_BLOCK, t)] = (noise[i][torch.from_numpy(position)] if self.fresh_noise else
                                               seeded_noise(self.noise_seed, self.image_ids[rows].tolist(), t,
                                                            tuple(self.latent_shape), split=self.noise_split))
                continue
            if self.fresh_noise:
                x_t = diffuse(images, t, noise[i][torch.from_numpy(position)], self.schedule)
            else:  # the extract job's x_t, bit for bit
                x_t = noisy_input(images, t, self.image_ids[rows].tolist(), self.noise_seed, self.schedule,
                                  split=self.noise_split)
            batch[(LIVE_KEY_BLOCK, t)] = x_t
        index = torch.from_numpy(rows)
        for key, values in self.cached.items():
            batch[key] = values[index]
        return batch, torch.from_numpy(self.labels[rows])

    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0,
                ranks: bool = False) -> Iterator[tuple[dict, torch.Tensor]]:
        """Every image once, in a seeded class-mixed order (row order when seed is None), decoded ahead.

        With ``ranks`` (a distributed run) each batch is this rank's contiguous share of the global
        batch of ``batch_size`` images: only those images are decoded.
        """
        order = epoch_order(self.num_images, seed, epoch).numpy() if seed is not None else np.arange(self.num_images)
        starts = list(range(0, self.num_images, batch_size))

        def produce(stop):
            for number, start in enumerate(starts):
                if stop.is_set():
                    return
                rows = order[start:start + batch_size]
                yield self._batch(rows, seed, epoch, number, distributed.share(len(rows)) if ranks else slice(None))

        return read_ahead(produce, depth=self.prefetch, name="diffrep-live-feed")
