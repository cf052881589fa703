"""Where a label map's pixels land in the backbone's square input, and back: the dense tasks' geometry.

``extract.inputs.images.resize_center_crop`` resizes an image's short side to S (BOX halvings, then
one BICUBIC resize) and keeps the centred S x S square. :func:`square_geometry` repeats its size
arithmetic without touching pixels, so a label map goes through the same resize (nearest
neighbour: class ids are never blended) and the same crop (:func:`label_to_input`), and a
prediction made on the square maps back onto the label's own pixels (:func:`source_box`) for
scoring at the label's resolution. Policy for non-square images: the centred square is what the
backbone sees, trains on and is scored on; the strips beyond it (a quarter of a 480x360 CamVid
frame) are neither trained on nor scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["SquareGeometry", "square_geometry", "label_to_input", "source_box"]


@dataclass(frozen=True)
class SquareGeometry:
    """An image of ``width x height`` resized to ``resized`` (w, h) and cropped at (left, top) to ``size`` x ``size``."""

    width: int
    height: int
    size: int
    resized: tuple[int, int]
    left: int
    top: int


def square_geometry(width: int, height: int, size: int) -> SquareGeometry:
    """The resize and crop ``resize_center_crop`` applies to a ``width x height`` image (the same integer arithmetic)."""
    w, h = int(width), int(height)
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
    scale = size / min(w, h)
    w, h = round(w * scale), round(h * scale)
    return SquareGeometry(int(width), int(height), int(size), (w, h), (w - size) // 2, (h - size) // 2)


def label_to_input(label: np.ndarray, size: int) -> np.ndarray:
    """A label map ``(H, W)`` uint8 resized (nearest) and centre-cropped exactly as its image is: ``(size, size)`` uint8."""
    geometry = square_geometry(label.shape[1], label.shape[0], size)
    resized = Image.fromarray(np.ascontiguousarray(label)).resize(geometry.resized, resample=Image.Resampling.NEAREST)
    out = np.asarray(resized)[geometry.top:geometry.top + size, geometry.left:geometry.left + size]
    return np.ascontiguousarray(out)


def source_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The label pixels the input square covers, ``(x0, y0, x1, y1)`` (x1, y1 exclusive), rounded to whole pixels.

    A prediction on the square, resized to ``(y1 - y0, x1 - x0)``, lies on ``label[y0:y1, x0:x1]``.
    """
    g = square_geometry(width, height, size)
    sx, sy = width / g.resized[0], height / g.resized[1]
    x0, x1 = round(g.left * sx), round((g.left + size) * sx)
    y0, y1 = round(g.top * sy), round((g.top + size) * sy)
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)
