"""JPEG decoding on the GPU (``diffrep extract --decode-device cuda``): nvJPEG through torchvision, resize and crop as tensors.

An option, not the default. A GPU that runs the truncated backbone at ~1,000 images/s needs
about ten CPU cores of PIL decoding to keep up (``make bench``); nvJPEG moves that work to the
GPU. The resize and crop that follow are PIL's bit for bit (its coefficients and fixed-point
rounding, computed exactly in float64), but the decoded pixels may differ from the default CPU
path: nvJPEG's inverse DCT and chroma upsampling are not libjpeg-turbo's (even torchvision's CPU
decoder differs from PIL's by one level in some pixels). Files that are not JPEG, or that nvJPEG
refuses (CMYK, some progressive files), are decoded by PIL on the CPU, as by default.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from extract.errors import ConfigError
from extract.inputs.images import _reason, load_pixels

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


_PRECISION_BITS = 22  # PIL's fixed-point coefficients for 8-bit images (32 - 8 - 2)


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_FILTERS = {"box": (_box, 0.5), "bicubic": (_bicubic, 2.0)}


@functools.lru_cache(maxsize=512)
def _coefficients(in_size: int, out_size: int, name: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's resampling taps (``precompute_coeffs`` then ``normalize_coeffs_8bpc``): ``(first, weights)``.

    ``weights`` is ``(out, taps)`` float64 holding integers, PIL's weights in 22-bit fixed point
    (the filter stretched by the scale when shrinking, normalised per output pixel), zero past
    each pixel's last tap; ``first`` ``(out, taps)`` the input indices they weigh (clamped inside
    the image where the weight is zero). Cached per size pair: a dataset has few distinct sizes.
    """
    kernel, support = _FILTERS[name]
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support *= filter_scale
    center = (np.arange(out_size) + 0.5) * scale
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncation, clamped as PIL does
    hi = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    taps = int(max(1, (hi - lo).max()))
    x = lo[:, None] + np.arange(taps)[None, :]
    inside = x < hi[:, None]
    weights = np.where(inside, kernel((x - center[:, None] + 0.5) / filter_scale), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=weights, where=total != 0.0)
    fixed = weights * (1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5))
    index = np.minimum(x, in_size - 1)
    return torch.from_numpy(index).to(device), torch.from_numpy(fixed).to(device)


def _pass(x: torch.Tensor, size: int, name: str) -> torch.Tensor:
    """One PIL pass along the last axis of float64 levels, rounded to uint8 levels as PIL does."""
    index, weights = _coefficients(x.shape[-1], size, name, str(x.device))
    taps = x[..., index]  # (..., out, taps)
    total = (taps * weights).sum(-1)
    return torch.floor((total + float(1 << (_PRECISION_BITS - 1))) / float(1 << _PRECISION_BITS)).clamp_(0, 255)


def _resample(x: torch.Tensor, size: tuple[int, int], name: str) -> torch.Tensor:
    """PIL's two-pass 8-bit resize of ``(3, H, W)`` float64 levels: horizontal, then vertical.

    Integer arithmetic in float64 is exact here (255 * 2**22 * a few hundred taps < 2**53), so the
    levels are PIL's bit for bit.
    """
    height, width = size
    if width != x.shape[-1]:
        x = _pass(x, width, name)
    if height != x.shape[-2]:
        x = _pass(x.transpose(-1, -2), height, name).transpose(-1, -2)
    return x


def resize_center_crop_tensor(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """guided-diffusion's resize and center crop (``images.resize_center_crop``) on a uint8 ``(3, H, W)`` tensor, any device.

    BOX halving while the short side is at least twice the target, then bicubic to the target,
    with PIL's own coefficients and rounding, so the pixels equal PIL's for the same decoded image.

    Returns:
        uint8 ``(3, S, S)`` on the image's device.
    """
    x = image.to(torch.float64)
    height, width = x.shape[-2:]
    while min(width, height) >= 2 * image_size:
        width, height = width // 2, height // 2
        x = _resample(x, (height, width), "box")
    scale = image_size / min(width, height)
    width, height = round(width * scale), round(height * scale)
    x = _resample(x, (height, width), "bicubic")
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return x[:, top:top + image_size, left:left + image_size].to(torch.uint8)


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
