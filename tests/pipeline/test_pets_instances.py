"""The pets sample as instances: masks from the trimaps, boxes their extent, and the real files' quirks handled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.archives import ensure_unpacked
from pipeline.errors import DatasetError
from pipeline.instances import DetectionImages, InstanceSplit
from pipeline.manifest import default_data_root
from pipeline.pets_instances import pet_class, pets_instances
from tests.shared_data import missing_shared


@pytest.fixture(scope="module")
def pets_root() -> Path:
    from pipeline.manifest import default_shared_dir

    archive = default_shared_dir() / "data" / "oxford-pets-sample.tar.gz"
    if not archive.is_file():
        missing_shared(f"{archive} is not here: the pets sample lives in ../shared/data beside the checkout")
    return ensure_unpacked(archive, default_data_root(), "oxford-pets-sample")


def test_masks_boxes_and_classes_follow_the_trimaps_and_the_quirky_files_are_handled(pets_root, tmp_path, caplog):
    listed = tmp_path / "list.txt"
    # the GIF (its trimap has no pet pixel), the RGBA PNG named .jpg, and a dog
    listed.write_text("Abyssinian_34 1 1 1\nAbyssinian_5 1 1 1\namerican_bulldog_10 2 2 1\n")
    document = pets_instances(pets_root, listed, "species")
    assert "Abyssinian_34: its trimap has no pet pixel" in caplog.text
    assert [i["file_name"] for i in document["images"]] == ["Abyssinian_5.jpg", "american_bulldog_10.jpg"]
    assert [c["name"] for c in document["categories"]] == ["cat", "dog"]
    for image, annotation in zip(document["images"], document["annotations"]):
        stem = image["file_name"][:-4]
        trimap = np.asarray(Image.open(pets_root / "annotations" / "trimaps" / f"{stem}.png"))
        pet = trimap == 1
        ys, xs = np.nonzero(pet)
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert (mask_utils.decode(annotation["segmentation"]) == pet).all()
        assert (image["height"], image["width"]) == pet.shape
        assert document["categories"][annotation["category_id"] - 1]["name"] == pet_class(stem, "species")
    split = InstanceSplit("pets", "x", pets_root / "images", document)
    image, target, image_id = DetectionImages(split, 32)[0]  # the RGBA PNG decodes to 3 channels
    assert image.shape == (3, 32, 32) and image_id == 2 and target["masks"].shape == (1, 32, 32)
    assert target["labels"].tolist() == [1]
    with pytest.raises(DatasetError, match="unknown pets label 'colour'"):
        pets_instances(pets_root, listed, "colour")
    assert pet_class("Bengal_12") == "Bengal" and pet_class("american_bulldog_3", "species") == "dog"
