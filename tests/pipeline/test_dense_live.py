"""segment --live: the crop and flip an image gets, its label map gets too."""

from __future__ import annotations

import torch

from pipeline.dense_live import joint_crop_flip


def test_label_follows_its_image_through_crop_and_flip():
    size = 32
    rows, cols = torch.meshgrid(torch.arange(size) * 4 // size, torch.arange(size) * 4 // size, indexing="ij")
    labels = (rows * 4 + cols).long()[None].repeat(6, 1, 1)  # 16 tiles, each a class
    images = (labels.float() / 15.0)[:, None].repeat(1, 3, 1, 1)  # the class written into the pixels
    out_images, out_labels = joint_crop_flip(images, labels, torch.Generator().manual_seed(3))
    assert out_labels.dtype == torch.long and set(out_labels.unique().tolist()) <= set(range(16))
    decoded = (out_images[:, 0] * 15.0).round().long()
    inner = torch.ones_like(out_labels, dtype=torch.bool)  # bilinear blends at tile edges: compare inside the tiles
    for axis in (1, 2):
        edge = out_labels.diff(dim=axis) != 0
        pad = [0, 0, 0, 0]
        pad[(2 - axis) * 2] = 1
        edge = torch.nn.functional.pad(edge, pad)
        inner &= ~edge & ~edge.roll(1, axis) & ~edge.roll(-1, axis)
    assert inner.float().mean() > 0.4 and torch.equal(decoded[inner], out_labels[inner])
    assert not torch.equal(out_labels, labels)  # something was cropped or flipped
