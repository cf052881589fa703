"""Image decoding and preprocessing as the ADM backbone expects: RGB, short side resized, center-cropped, in [-1, 1].

The resize follows guided-diffusion's training pipeline (``image_datasets.center_crop_arr``):
halve the image with a BOX filter while its short side is at least twice the target, then a
BICUBIC resize that brings the short side to exactly ``image_size``, then a center crop; pixels
become ``uint8 / 127.5 - 1``. EXIF orientation is not applied, as guided-diffusion does not.

Everything here is pure and thread-safe (no global state), so extraction workers can import it
and decode in threads: PIL releases the GIL while it decodes and resizes.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "to_rgb",
    "resize_center_crop",
    "preprocess",
    "load_image",
    "load_batch",
    "load_pixels",
    "to_model_input",
]

logger = logging.getLogger(__name__)

#: File name endings (lower case) that dataset indexing treats as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    Grayscale (``1``, ``L``, ``LA``), palette (``P``, ``PA``, with or without transparency), ``RGBA``,
    ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` go through PIL's conversion; alpha is dropped, not
    composited, as guided-diffusion's ``convert("RGB")`` does. 16-bit and 32-bit integer gray
    (``I;16*``, ``I``) are scaled from 0..65535 to 0..255 (``I`` only when its values exceed 255),
    and float gray (``F``) from 0..1 when its values fit in 0..1, else clipped to 0..255.

    Args:
        image: a decoded PIL image.

    Returns:
        An ``RGB`` image of the same size (the input itself when it already is RGB).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        gray = np.asarray(image, dtype=np.float64)
        if mode in _SIXTEEN_BIT_MODES or (mode == "I" and gray.max(initial=0) > 255):
            gray = gray / 257.0
        elif mode == "F" and gray.size and gray.min() >= 0.0 and gray.max() <= 1.0:
            gray = gray * 255.0
        gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return Image.fromarray(gray8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        # PIL asks for palette transparency to go through RGBA; the alpha is then dropped.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """Resize the short side to ``image_size`` and center-crop to a square, as guided-diffusion does.

    Args:
        image: an RGB PIL image of any size.
        image_size: side S of the square output in pixels.

    Returns:
        An ``(S, S)`` RGB PIL image. When the long side does not split evenly, the crop keeps
        the extra pixel on the right / bottom (offset ``(long - S) // 2``).
    """
    width, height = image.size
    while min(width, height) >= 2 * image_size:
        width, height = width // 2, height // 2
        image = image.resize((width, height), resample=Image.Resampling.BOX)
    scale = image_size / min(width, height)
    width, height = round(width * scale), round(height * scale)
    image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    left = (width - image_size) // 2
    top = (height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def preprocess(image: Image.Image, image_size: int, flip: bool = False) -> torch.Tensor:
    """Turn a decoded PIL image into the backbone's input.

    Args:
        image: a PIL image of any mode and size.
        image_size: side S of the model resolution in pixels.
        flip: mirror the result left-right (the horizontal-flip view).

    Returns:
        float32 tensor ``(3, S, S)`` with values ``uint8 / 127.5 - 1`` in [-1, 1].
    """
    array = np.asarray(resize_center_crop(to_rgb(image), image_size), dtype=np.uint8)
    if flip:
        array = array[:, ::-1]
    pixels = array.astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_pixels(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode one image file to the backbone's pixels before scaling: ``(3, S, S)`` uint8.

    The extraction pipeline keeps pixels as uint8 until they reach the device (a quarter of the
    bytes to hold and copy); :func:`to_model_input` then gives exactly what :func:`preprocess` gives.

    Raises:
        OSError, ValueError, PIL.UnidentifiedImageError: as :func:`load_image`.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    with Image.open(path) as image:
        image.load()
        array = np.asarray(resize_center_crop(to_rgb(image), image_size), dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``(..., 3, S, S)`` on any device to float32 ``uint8 / 127.5 - 1`` (the same bits as :func:`preprocess`)."""
    return pixels.to(torch.float32) / 127.5 - 1.0


def load_image(path: str | os.PathLike, image_size: int, flip: bool = False) -> torch.Tensor:
    """Decode one image file and preprocess it (see :func:`preprocess`).

    Args:
        path: image file.
        image_size: side S of the model resolution in pixels.
        flip: return the horizontally flipped view.

    Returns:
        float32 tensor ``(3, S, S)`` in [-1, 1].

    Raises:
        OSError, ValueError, PIL.UnidentifiedImageError: the file is missing, truncated or not an
            image. Use :func:`load_batch` to get a reason instead of an exception.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    with Image.open(path) as image:
        image.load()
        return preprocess(image, image_size, flip=flip)


def _reason(exc: BaseException) -> str:
    """One line naming why an image could not be used."""
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"


def load_batch(
    paths: Sequence[str | os.PathLike],
    image_size: int,
    flip: bool = False,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
    """Decode and preprocess many images; a bad file never raises, it is reported.

    Args:
        paths: image files, in the order of the returned rows.
        image_size: side S of the model resolution in pixels.
        flip: return the horizontally flipped view of every image (identical to
            ``images.flip(-1)`` of the unflipped batch).
        num_threads: decoding threads; None uses ``min(8, cpu count, len(paths))``, 1 decodes in
            the calling thread.

    Returns:
        ``(images, ok, errors)``: float32 tensor ``(n, 3, S, S)`` in [-1, 1], with zeros in the
        rows of unusable files; bool array ``(n,)``, False for those rows; ``{row: reason}``
        with a one-line reason for each of them (missing, unreadable, truncated, not an image).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    count = len(paths)
    images = torch.zeros((count, 3, image_size, image_size), dtype=torch.float32)
    ok = np.zeros(count, dtype=bool)
    errors: dict[int, str] = {}

    def decode(row: int) -> None:
        try:
            images[row] = load_image(paths[row], image_size, flip=flip)
            ok[row] = True
        except Exception as exc:  # noqa: BLE001 - any failure of one file is reported, never raised
            errors[row] = _reason(exc)
            logger.warning("skipping unreadable image %s: %s", paths[row], errors[row])

    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1, max(count, 1))
    if num_threads <= 1 or count <= 1:
        for row in range(count):
            decode(row)
    else:
        with ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="diffrep-decode") as pool:
            list(pool.map(decode, range(count)))
    return images, ok, dict(sorted(errors.items()))
