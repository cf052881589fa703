"""Instance datasets for detection: a COCO-format split (instances JSON + image folder) read into training samples.

A manifest entry of format ``coco`` names, per split, the image folder (``path``) and the
instances JSON (``list``); COCO itself is such an entry. Format ``pets_instances`` builds the
same document from the Oxford-IIIT Pet trimaps (``pipeline.pets_instances``). Either way the
split becomes an :class:`InstanceSplit`: the document (kept whole: it is the ground truth
pycocotools scores against, at the original image sizes) and :class:`DetectionImages`, the
samples a detector trains on: each image decoded to RGB (a GIF or RGBA file too), resized to a
square ``image_size`` side, its boxes and masks scaled alike, crowd regions left out of training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.archives import WHERE_HINT, ensure_unpacked
from pipeline.errors import DatasetError
from pipeline.manifest import Manifest, get_dataset
from pipeline.pets_instances import pets_instances

__all__ = ["INSTANCE_FORMATS", "InstanceSplit", "DetectionImages", "read_instances", "annotation_mask"]

log = logging.getLogger(__name__)

#: Manifest formats that hold instances (boxes and masks) rather than one label per image.
INSTANCE_FORMATS = ("coco", "pets_instances")


@dataclass
class InstanceSplit:
    """One split of an instance dataset.

    Attributes:
        dataset, split: the manifest names. image_dir: where ``file_name`` s are.
        coco: the COCO instances document (images, annotations, categories), original sizes.
    """

    dataset: str
    split: str
    image_dir: Path
    coco: dict

    @property
    def category_ids(self) -> list[int]:
        """COCO category ids in sorted order: the detector's label k (1-based) is ``category_ids[k - 1]``."""
        return sorted(c["id"] for c in self.coco["categories"])

    @property
    def num_images(self) -> int:
        return len(self.coco["images"])

    def head(self, n: int | None) -> "InstanceSplit":
        """The first ``n`` images (in document order) and their annotations; None keeps all."""
        if n is None or n >= self.num_images:
            return self
        images = self.coco["images"][:n]
        kept = {image["id"] for image in images}
        coco = dict(self.coco, images=images, annotations=[a for a in self.coco["annotations"] if a["image_id"] in kept])
        return InstanceSplit(self.dataset, self.split, self.image_dir, coco)


def read_instances(dataset: str, split: str, *, root: str | None = None, manifest: Manifest | None = None,
                   limit: int | None = None, label: str | None = None) -> InstanceSplit:
    """One split of an instance dataset named in the manifest (unpacked from its archive on first use).

    Args:
        dataset, split: manifest names (``pets``/``train``, ``coco``/``val``).
        root: the data root (``--data-root``). limit: keep the first n images.
        label: the pets class (``breed``/``species``), overriding the entry's ``options.label``.

    Raises:
        DatasetError: the dataset is not an instance dataset, or its folder or JSON is missing (one line
            naming what and where).
    """
    spec = get_dataset(dataset, manifest, {"data_root": root} if root else None)
    where = spec.split(split)
    if where.format not in INSTANCE_FORMATS:
        raise DatasetError(f"dataset '{dataset}' has format {where.format}, not instances: detection reads a "
                           f"{' or '.join(INSTANCE_FORMATS)} entry (e.g. pets, or coco when you have it)")
    if spec.source_archive is not None and not spec.root.exists():
        ensure_unpacked(spec.source_archive, spec.data_root, spec.root.name)
    if where.format == "pets_instances":
        image_dir = spec.root / "images"
        if where.list_file is None or not where.list_file.is_file():
            raise DatasetError(f"dataset '{dataset}' split '{split}': list {where.list_file} does not exist; {WHERE_HINT}")
        coco = pets_instances(spec.root, where.list_file, label or spec.options.get("label", "breed"), limit)
    else:
        image_dir = where.path
        if not image_dir.is_dir() or where.list_file is None or not where.list_file.is_file():
            raise DatasetError(f"dataset '{dataset}' split '{split}' is not here (images {image_dir}, instances "
                               f"{where.list_file}): put COCO under the data root or pass --data-root")
        try:
            coco = json.loads(where.list_file.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"instances file {where.list_file} cannot be read as JSON ({exc}): replace it") from None
    instances = InstanceSplit(dataset, split, image_dir, coco)
    return instances.head(limit)


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """(height, width) uint8 mask of one annotation: polygons, RLE or uncompressed RLE (pycocotools decodes them)."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class DetectionImages(torch.utils.data.Dataset):
    """Training samples of an instance split at a square input side: ``(image, target, image_id)``.

    ``image`` is (3, S, S) float32 in [0, 1]; ``target`` is torchvision's detection target:
    ``boxes`` (n, 4) float32 x0 y0 x1 y1 in input pixels, ``labels`` (n,) int64 in 1..K (the
    split's categories in sorted id order), ``masks`` (n, S, S) uint8. Crowd annotations and
    boxes under one input pixel are left out. ``preload`` keeps every decoded sample in memory
    (small sets: decoded once, not every epoch).
    """

    def __init__(self, instances: InstanceSplit, image_size: int, masks: bool = True, preload: bool = False):
        self.instances, self.size, self.masks = instances, int(image_size), masks
        self.labels = {cid: k + 1 for k, cid in enumerate(instances.category_ids)}
        self.by_image: dict[int, list[dict]] = {}
        for a in instances.coco["annotations"]:
            self.by_image.setdefault(a["image_id"], []).append(a)
        self.cache: dict[int, tuple] | None = {} if preload else None

    def __len__(self) -> int:
        return self.instances.num_images

    def __getitem__(self, row: int) -> tuple[torch.Tensor, dict, int]:
        if self.cache is not None and row in self.cache:
            return self.cache[row]
        sample = self._decode(row)
        if self.cache is not None:
            self.cache[row] = sample
        return sample

    def _decode(self, row: int) -> tuple[torch.Tensor, dict, int]:
        info = self.instances.coco["images"][row]
        path = self.instances.image_dir / info["file_name"]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except OSError as exc:
            raise DatasetError(f"image {path} cannot be decoded ({exc}): replace it or drop it from the instances") from None
        width, height = rgb.size
        side = self.size
        pixels = np.asarray(rgb.resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        sx, sy = side / width, side / height
        boxes, labels, masks = [], [], []
        for a in self.by_image.get(info["id"], []):
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = a["bbox"]
            box = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            boxes.append(box)
            labels.append(self.labels[a["category_id"]])
            if self.masks:
                full = Image.fromarray(annotation_mask(a, height, width) * 255)
                masks.append(np.asarray(full.resize((side, side), Image.BILINEAR)) >= 128)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64)}
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks else \
                torch.zeros((0, side, side), dtype=torch.uint8)
        return image, target, int(info["id"])
