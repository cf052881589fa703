"""Oxford-IIIT Pet as an instance set: one pet per image, its mask the trimap's pet pixels, its box the mask's extent.

The dataset ships trimaps (1 = pet, 2 = background, 3 = the boundary ring, left out as the data's
README says: "ignore") and split lists (``trainval.txt``, ``test.txt``: ``<Breed>_<n> class species
breed``). This module turns one split into a COCO instances document held in memory (images,
annotations with run-length masks, categories), so detection reads pets and COCO through one
reader (``pipeline.instances``). The class is the breed (the name before the last ``_``) or the
species (a capitalised name is a cat, the dataset's own convention). All pets reading lives here,
to be unified with the semantic-segmentation readers later.

Quirks of the real files are handled, not hidden: an image whose trimap has no pet pixel is left
out with a warning (it has no instance); a file named ``.jpg`` that is a GIF or an RGBA PNG is
only measured here (PIL reads any format) and converted to RGB where images are decoded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.errors import DatasetError

__all__ = ["LABELS", "pets_instances", "pet_class"]

log = logging.getLogger(__name__)

#: What a pet's class is: its breed (3 in the sample) or its species (cat, dog).
LABELS = ("breed", "species")


def pet_class(stem: str, label: str = "breed") -> str:
    """The class of image ``<Breed>_<n>``: the breed, or ``cat``/``dog`` (a capitalised breed is a cat)."""
    breed = stem.rsplit("_", 1)[0]
    if label == "species":
        return "cat" if breed[:1].isupper() else "dog"
    return breed


def _listed(list_file: Path) -> list[str]:
    try:
        lines = list_file.read_text().splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read the pets split list {list_file} ({exc.strerror or exc}): "
                           f"unpack oxford-pets-sample again or fix the manifest's list") from None
    return [line.split()[0] for line in lines if line.strip() and not line.startswith("#")]


def pets_instances(root: str | Path, list_file: str | Path, label: str = "breed", limit: int | None = None) -> dict:
    """One split of the pets sample as a COCO instances document.

    Args:
        root: the unpacked ``oxford-pets-sample`` folder (``images/``, ``annotations/trimaps/``).
        list_file: the split's list (``annotations/trainval.txt`` or ``test.txt``).
        label: ``breed`` or ``species``. limit: read only the first n listed images (the classes are all the list's).

    Returns:
        ``{"images": [{id, file_name, width, height}], "annotations": [{id, image_id, category_id,
        bbox [x, y, w, h], area, iscrowd, segmentation (RLE)}], "categories": [{id, name}]}``;
        file names are relative to ``root/images``; ids count from 1 in list order, categories in
        sorted name order.

    Raises:
        DatasetError: an unknown label, a listed image or trimap that is missing or unreadable.
    """
    if label not in LABELS:
        raise DatasetError(f"unknown pets label {label!r}: choose one of {', '.join(LABELS)}")
    root = Path(root)
    stems = _listed(Path(list_file))
    names = sorted({pet_class(stem, label) for stem in stems})
    category = {name: i + 1 for i, name in enumerate(names)}
    images, annotations = [], []
    for image_id, stem in enumerate(stems[:limit], start=1):
        image_path, trimap_path = root / "images" / f"{stem}.jpg", root / "annotations" / "trimaps" / f"{stem}.png"
        try:
            with Image.open(image_path) as image:
                width, height = image.size
            with Image.open(trimap_path) as trimap:
                if trimap.size != (width, height):
                    log.warning("%s: trimap is %s but the image %s; resized (nearest)", stem, trimap.size, (width, height))
                    trimap = trimap.resize((width, height), Image.NEAREST)
                pet = np.asarray(trimap) == 1
        except OSError as exc:
            raise DatasetError(f"pets image or trimap of {stem} cannot be read ({exc}): unpack oxford-pets-sample "
                               f"again, or remove {stem} from {Path(list_file).name}") from None
        if not pet.any():
            log.warning("%s: its trimap has no pet pixel, left out (no instance to detect)", stem)
            continue
        rows, cols = np.flatnonzero(pet.any(axis=1)), np.flatnonzero(pet.any(axis=0))
        x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        rle = mask_utils.encode(np.asfortranarray(pet.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height})
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": category[pet_class(stem, label)],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(pet.sum()), "iscrowd": 0,
                            "segmentation": rle})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name, "supercategory": label} for name, i in category.items()]}
