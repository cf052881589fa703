"""JPEG decoding on the GPU (``diffrep extract --decode-device cuda``): nvJPEG through torchvision, resize and crop as tensors.

An option, not the default. A GPU that runs the truncated backbone at ~1,000 images/s needs
about ten CPU cores of PIL decoding to keep up (``make bench``); nvJPEG moves that work to the
GPU. The pixels may then differ from the default CPU path by a few levels: nvJPEG's inverse DCT
and chroma upsampling are not libjpeg-turbo's, and the tensor resize below follows
guided-diffusion's PIL resize (BOX halving, then an antialiased bicubic, rounded to uint8 after
each step) closely but not bit for bit. Files that are not JPEG, or that nvJPEG refuses (CMYK,
some progressive files), are decoded by PIL on the CPU, as by default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .images import _reason, load_pixels

__all__ = ["DECODE_DEVICES", "check_decode_device", "resize_center_crop_tensor", "load_pixels_on_device"]

logger = logging.getLogger(__name__)

DECODE_DEVICES = ("cpu", "cuda")
_JPEG_MAGIC = b"\xff\xd8"


def check_decode_device(decode_device: str, device: torch.device | str) -> None:
    """Refuse a decode device this machine or this run cannot use, in one line.

    Raises:
        ConfigError: an unknown decode device; cuda on a machine without a CUDA GPU, or while the
            backbone runs on the CPU; cuda without torchvision.
    """
    if decode_device not in DECODE_DEVICES:
        raise ConfigError(f"decode device {decode_device!r} is unknown: choose {' or '.join(DECODE_DEVICES)}")
    if decode_device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ConfigError("--decode-device cuda needs a CUDA GPU and this machine has none: "
                          "leave --decode-device out (PIL decodes on the CPU by default)")
    if torch.device(device).type != "cuda":
        raise ConfigError(f"--decode-device cuda decodes on the GPU the backbone runs on, but --device is {device}: "
                          "use --device cuda, or leave --decode-device out")
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        raise ConfigError("--decode-device cuda needs torchvision (decode_jpeg): install it, or leave "
                          "--decode-device out") from None


def _round_to_levels(x: torch.Tensor) -> torch.Tensor:
    """PIL stores every resize step as uint8, rounding halves up."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def resize_center_crop_tensor(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """guided-diffusion's resize and center crop (``images.resize_center_crop``) on a uint8 ``(3, H, W)`` tensor, any device.

    Halves the image by 2x2 averaging while its short side is at least twice the target (exact
    for even sides; odd sides average uneven bins where PIL weighs fractions), then an
    antialiased bicubic brings the short side to ``image_size``; the crop keeps the extra pixel
    on the right / bottom as PIL's does.

    Returns:
        uint8 ``(3, S, S)`` on the image's device.
    """
    x = image.unsqueeze(0).to(torch.float32)
    height, width = x.shape[-2:]
    while min(width, height) >= 2 * image_size:
        width, height = width // 2, height // 2
        x = _round_to_levels(F.interpolate(x, size=(height, width), mode="area"))
    scale = image_size / min(width, height)
    width, height = round(width * scale), round(height * scale)
    x = _round_to_levels(F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False))
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return x[0, :, top:top + image_size, left:left + image_size].to(torch.uint8)


def load_pixels_on_device(
    paths: Sequence[str | os.PathLike], image_size: int, device: torch.device | str
) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
    """Decode a batch of image files on ``device`` (nvJPEG on a GPU), resized and cropped there.

    Args:
        paths: image files, in row order. image_size: side S. device: where to decode (cuda; the
            CPU works too, through libjpeg-turbo, and is what the tests run).

    Returns:
        ``(pixels, ok, errors)``: uint8 ``(n, 3, S, S)`` on ``device`` with zeros in unusable rows,
        bool ``(n,)``, ``{row: one-line reason}``, as ``images.load_batch`` reports them.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    count = len(paths)
    out = torch.zeros((count, 3, image_size, image_size), dtype=torch.uint8, device=device)
    ok = np.zeros(count, dtype=bool)
    errors: dict[int, str] = {}
    encoded: dict[int, torch.Tensor] = {}
    by_pil: list[int] = []
    for row, path in enumerate(paths):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            errors[row] = _reason(exc)
            continue
        if data[:2] == _JPEG_MAGIC:
            encoded[row] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            by_pil.append(row)
    rows = sorted(encoded)
    try:
        decoded = dict(zip(rows, decode_jpeg([encoded[r] for r in rows], mode=ImageReadMode.RGB, device=device)))
    except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
        decoded = {}
        for row in rows:
            try:
                decoded[row] = decode_jpeg(encoded[row], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                by_pil.append(row)  # PIL decodes what nvJPEG cannot, or names why nobody can
    for row, image in decoded.items():
        out[row] = resize_center_crop_tensor(image, image_size)
        ok[row] = True
    for row in sorted(by_pil):
        try:
            out[row] = torch.from_numpy(load_pixels(paths[row], image_size)).to(device)
            ok[row] = True
        except Exception as exc:  # noqa: BLE001 - any failure of one file is reported, never raised
            errors[row] = _reason(exc)
    for row, reason in sorted(errors.items()):
        logger.warning("skipping unreadable image %s: %s", paths[row], reason)
    return out, ok, dict(sorted(errors.items()))
