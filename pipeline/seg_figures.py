"""Segmentation pictures: image, ground truth and prediction side by side for a few test images, fixed palette, legend.

All three panels show the part of the label map the backbone's input square covers, at the label's
own resolution (what was scored). Class c always gets ``PALETTE[c]``; ignored pixels are black.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from extract.inputs.dense_geometry import source_box
from extract.inputs.images import to_rgb

__all__ = ["PALETTE", "colorize", "draw_predictions"]

PALETTE = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0), (192, 128, 128),
    (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (230, 159, 0), (86, 180, 233), (0, 158, 115),
    (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167), (255, 255, 255), (150, 75, 0),
], dtype=np.uint8)
"""20 fixed colours (CamVid's own for its 11 classes, then Okabe-Ito); more classes repeat them."""


def colorize(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 colours, black where ignored."""
    out = PALETTE[label.astype(np.int64) % len(PALETTE)]
    out[label == ignore_index] = 0
    return out


def draw_predictions(items: Sequence[tuple[str, np.ndarray, np.ndarray]], class_names: Sequence[str], size: int,
                     path: str | Path) -> Path:
    """One row per image: image, truth, prediction (the scored box), and a legend of every class.

    Args:
        items: ``(image path, full label (H, W), prediction of the box)``. size: the input side (gives the box).
        path: the PNG to write (folders created).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(items), 3, figsize=(9, 3 * len(items)), squeeze=False)
    for row, (image_path, label, prediction) in enumerate(items):
        x0, y0, x1, y1 = source_box(label.shape[1], label.shape[0], size)
        with Image.open(image_path) as image:
            image = to_rgb(image).resize((label.shape[1], label.shape[0]))
        panels = (np.asarray(image)[y0:y1, x0:x1], colorize(label[y0:y1, x0:x1]), colorize(prediction))
        for ax, panel, title in zip(axes[row], panels, ("image", "ground truth", "prediction")):
            ax.imshow(panel)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    handles = [Patch(color=PALETTE[i % len(PALETTE)] / 255, label=name) for i, name in enumerate(class_names)]
    handles.append(Patch(color=(0, 0, 0), label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if len(items) > 1 else 0.15, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
