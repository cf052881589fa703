"""Dense datasets: CamVid and the pets read by stem with their own codes mapped to class ids, and the label geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.inputs.dense_geometry import label_to_input, source_box, square_geometry
from extract.inputs.images import load_pixels, resize_center_crop
from pipeline.dense_data import IGNORE, build_dense_index, dense_dataset_names, get_dense_dataset
from pipeline.errors import DatasetError
from pipeline.manifest import default_shared_dir
from tests.shared_data import missing_shared


def dense(name: str, split: str):
    """A real dense split (unpacked from ../shared once per machine), or a skip/fail when the archive is absent."""
    archive = get_dense_dataset(name, unpack=False).source_archive if default_shared_dir().is_dir() else None
    try:
        return build_dense_index(name, split)
    except DatasetError as exc:
        if archive is None or not archive.is_file():
            missing_shared(f"{name} is not here: {exc}")
        raise


def test_manifest_names_the_dense_datasets():
    assert {"camvid", "pets-seg", "pets-seg-breeds", "ade20k"} <= set(dense_dataset_names())


def test_camvid_pairs_by_stem_and_ignores_void():
    train, val = dense("camvid", "train"), dense("camvid", "val")
    assert (len(train), len(val)) == (367, 101)
    assert train.num_classes == 11 and train.class_names[0] == "sky" and train.class_names[10] == "bicyclist"
    assert all(Path(i).stem == Path(l).stem for i, l in zip(val.image_paths, val.label_paths))
    raw = np.asarray(Image.open(val.label_paths[0]))
    label = val.read_label(0)
    assert label.shape == raw.shape == (360, 480)
    assert np.array_equal(label == IGNORE, raw >= 11) and np.array_equal(label[raw < 11], raw[raw < 11])


def test_pets_use_their_lists_and_trimap_codes():
    train, test = dense("pets-seg", "train"), dense("pets-seg", "test")
    assert (len(train), len(test)) == (300, 298)  # Abyssinian_34 (a GIF) and _82 are in no list
    assert train.class_names == ["background", "pet"] and sorted(train.image_class_names) == ["Abyssinian", "Bengal", "american_bulldog"]
    row = test.stems.index("Abyssinian_5")  # an RGBA PNG named .jpg
    assert load_pixels(test.image_paths[row], 32).shape == (3, 32, 32)
    raw = np.asarray(Image.open(test.label_paths[row]))
    label = test.read_label(row)
    assert np.array_equal(label == 1, raw == 1) and np.array_equal(label == 0, raw == 2) and np.array_equal(label == IGNORE, raw == 3)
    breeds = dense("pets-seg-breeds", "test")
    assert breeds.class_names == ["background", "Abyssinian", "american_bulldog", "Bengal"]
    row = breeds.stems.index(next(s for s in breeds.stems if s.startswith("Bengal")))
    raw = np.asarray(Image.open(breeds.label_paths[row]))
    assert np.array_equal(breeds.read_label(row) == 3, raw == 1)


def test_absent_and_unknown_datasets_are_one_line(tmp_path):
    with pytest.raises(DatasetError, match="ade20k' is not here .*SceneParsing"):
        build_dense_index("ade20k", "val", data_root=tmp_path)
    with pytest.raises(DatasetError, match="unknown dense dataset 'nope'"):
        build_dense_index("nope", "val")


def test_an_image_without_its_label_map_is_refused(tmp_path):
    (tmp_path / "toy" / "img").mkdir(parents=True)
    (tmp_path / "toy" / "lab").mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (8, 6)).save(tmp_path / "toy" / "img" / f"{stem}.jpg")
    Image.new("L", (8, 6), 1).save(tmp_path / "toy" / "lab" / "a.png")
    manifest = tmp_path / "m.yaml"
    manifest.write_text("segmentation:\n  toy:\n    root: toy\n    classes: [x, y]\n"
                        "    splits: {train: {images: img, labels: lab}}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="1 image\\(s\\) have no label map .* e.g. b"):
        build_dense_index("toy", "train", manifest=manifest, data_root=tmp_path)
    Image.new("L", (8, 6), 7).save(tmp_path / "toy" / "lab" / "b.png")
    index = build_dense_index("toy", "train", manifest=manifest, data_root=tmp_path)
    assert index.stems == ["a", "b"] and index.read_label(0).max() == 1 and index.read_label(1).max() == IGNORE


@pytest.mark.parametrize("width,height,size", [(480, 360, 64), (360, 480, 96), (250, 202, 32), (1646, 1100, 128)])
def test_a_label_goes_where_its_image_goes(width, height, size):
    """A map of 4x4 constant tiles, cropped as a label and (independently) as an image by the extraction's own
    bicubic resize_center_crop, agrees away from the tile edges; source_box maps the square back to its pixels."""
    rows, cols = np.meshgrid(np.arange(height) * 4 // height, np.arange(width) * 4 // width, indexing="ij")
    label = ((rows * 4 + cols) * 16).astype(np.uint8)
    as_label = label_to_input(label, size)
    as_image = np.asarray(resize_center_crop(Image.fromarray(label).convert("RGB"), size))[..., 0]
    as_image = (np.round(as_image / 16.0) * 16).clip(0, 240).astype(np.uint8)  # bicubic ringing rounded away
    assert as_label.shape == (size, size)
    inner = np.ones_like(as_label, dtype=bool)
    for axis in (0, 1):
        for edge in np.unique(np.nonzero(np.diff(as_label.astype(int), axis=axis))[axis]):
            index = [slice(None), slice(None)]
            index[axis] = slice(max(0, edge - 1), edge + 3)
            inner[tuple(index)] = False
    assert inner.mean() > 0.2 and np.array_equal(as_label[inner], as_image[inner])
    x0, y0, x1, y1 = source_box(width, height, size)
    g = square_geometry(width, height, size)
    assert (x1 - x0) == pytest.approx(size * width / g.resized[0], abs=1) and (y1 - y0) == pytest.approx(size * height / g.resized[1], abs=1)
    back = np.asarray(Image.fromarray(as_label).resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST))
    assert (back == label[y0:y1, x0:x1]).mean() > 0.97


def test_camvid_square_is_the_centre_of_the_frame():
    assert source_box(480, 360, 64) == (56, 0, 418, 360)  # halved twice to 120x90, then 85x64: centre 64 of 85


def test_ade20k_layout_reads_its_class_table_and_shifts_labels(tmp_path):
    """The SceneParsing layout (made up here, 3 images): names from objectInfo150.txt, 0 ignored, v -> v - 1."""
    root = tmp_path / "ADEChallengeData2016"
    lines = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0.01\t10\t1\tname{i};alias" for i in range(1, 151)]
    root.mkdir()
    (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (6, 4)).save(root / "images" / split / f"ADE_{split}_1.jpg")
        Image.fromarray(np.array([[0, 1, 150, 151, 7, 7]] * 4, dtype=np.uint8)).save(root / "annotations" / split / f"ADE_{split}_1.png")
    index = build_dense_index("ade20k", "val", data_root=tmp_path)
    assert index.num_classes == 150 and index.class_names[0] == "name1" and index.class_names[149] == "name150"
    assert index.read_label(0)[0].tolist() == [IGNORE, 0, 149, IGNORE, 6, 6]
