"""The one noisy forward: seeded noise -> x_t -> the backbone's truncated forward -> pooled block features.

Every path that needs x_t or block features calls these two functions: the extract job (whose
rows are the cache), the live head and live image feed (``probe --live``, DifFeed's input), and
the pretraining probe check. The cache equals the live path because they are the same code.

``noisy_input`` builds x_t from (seed, image id, t, draw) as ``extract.noise`` draws it;
``diffuse`` is the same step for noise the caller already has (drawn ahead on another thread,
or fresh noise every training step). ``block_features`` runs one forward that stops after the
deepest block asked for, under the chosen autocast, and pools as the cache stores (float16), or
in float32 for a backbone that trains. Neither function waits for the host on a GPU: the
schedule's coefficients are moved once per (t, device) and the timesteps are filled on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from extract.noise import seeded_noise
from extract.pooling import pool_features, pool_float
from extract.precision import autocast
from extract.schedule import NoiseSchedule

__all__ = ["noisy_input", "diffuse", "block_features", "model_input"]


def model_input(model: nn.Module, pixels: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """x0 of a backbone: the images themselves (ADM), or its family's latent (``model.encode``: SD's VAE), no gradients.

    Args:
        pixels: (N, 3, S, S) images in [-1, 1]. precision: autocast of the encoder (the latent is float32).

    Returns:
        (N, C, h, w) float32 x0 on pixels' device: the noise is drawn in this shape.
    """
    encode = getattr(model, "encode", None)
    if encode is None:
        return pixels
    with torch.no_grad(), autocast(pixels.device, precision):
        return encode(pixels).float()


def noisy_input(x0: torch.Tensor, t: int, image_ids: Sequence[int], seed: int, schedule: NoiseSchedule,
                draw: int = 0, split: str = "") -> torch.Tensor:
    """x_t of clean images at one timestep with their seeded noise (the noise every cache holds).

    Args:
        x0: (N, 3, H, W) clean images in [-1, 1], on any device.
        t: the timestep of every image. image_ids: (N,) each image's id (its dataset-index position).
        seed: the run's noise seed. schedule: the backbone's schedule.
        draw: which of ``--noise-draws`` independent draws (0: the one every cache has).
        split: the images' split, part of the noise key (``extract.noise``); every cache passes it.

    Returns:
        (N, 3, H, W) float32 x_t on x0's device.
    """
    noise = seeded_noise(seed, list(image_ids), int(t), tuple(x0.shape[1:]), draw=draw, split=split)
    return diffuse(x0, t, noise, schedule)


def diffuse(x0: torch.Tensor, t: int, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """x_t of clean images at one timestep with the given noise (``q_sample``).

    Args:
        x0: (N, 3, H, W) clean images in [-1, 1]. t: the timestep of every image.
        noise: like x0, on any device: it is copied to x0's without blocking (pin it for an
            asynchronous copy to a GPU).

    Returns:
        (N, 3, H, W) x_t on x0's device.
    """
    return schedule.q_sample(x0, int(t), noise.to(x0.device, non_blocking=True))


def block_features(model: nn.Module, x_t: torch.Tensor, t: int | torch.Tensor, blocks: Iterable[int],
                   pool: int | None = None, inject: Mapping[int, torch.Tensor] | None = None,
                   precision: str = "fp32", float16: bool = True, cond: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """The requested blocks' outputs from ONE forward that stops after the deepest, pooled as the cache stores them.

    Gradients follow the caller's grad mode (``torch.inference_mode`` for extraction).

    Args:
        model: a backbone with ``features(x_t, timesteps, blocks, inject=...)``.
        x_t: (N, 3, H, W) noisy images. t: their timestep (one int), or (N,) timesteps on x_t's device.
        blocks: paper block numbers. pool: side of the adaptive average pool (0: full maps); None
            returns the maps unpooled, in the model's compute dtype.
        inject: ``{encoder block: map}`` added to those blocks' outputs (DifFeed's second pass).
        precision: fp32, bf16 or fp16 autocast of the forward (``extract.precision``).
        float16: pooled maps rounded to float16, as the cache stores them; False keeps float32
            (a backbone that trains).
        cond: the family's conditioning (SD: a (1 or N, L, D) text embedding, e.g. a learnable one; None: its default).

    Returns:
        ``{b: (N, C_b, h, w)}``, h = min(native size, pool).
    """
    blocks = list(blocks)
    steps = t if torch.is_tensor(t) else torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
    extra = {"inject": inject} if inject else {}  # only DifFeed's pass 2 injects: a plain forward is asked no more
    if cond is not None:
        extra["cond"] = cond
    with autocast(x_t.device, precision):
        maps = model.features(x_t, steps, blocks, **extra)
    if pool is None:
        return maps
    pool_maps = pool_features if float16 else pool_float
    return {b: pool_maps(maps[b], pool) for b in blocks}
