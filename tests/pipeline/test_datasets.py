"""Dataset indexing: reproducible order, class-balanced subsets, every layout, errors before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DatasetError
from pipeline.datasets import build_index
from pipeline.manifest import load_manifest

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _image(path: Path, color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def _manifest(tmp_path: Path, entries: str):
    path = tmp_path / "manifest.yaml"
    path.write_text("datasets:\n" + entries, encoding="utf-8")
    return load_manifest(path)


def _per_class(index) -> list[int]:
    """Images per label of an index, counted here."""
    return [int((index.labels == label).sum()) for label in range(index.num_classes)]


def _tree(root: Path, layout: dict[str, list[str]]) -> Path:
    for class_name, files in layout.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        for name in files:
            _image(root / class_name / name)
    return root


# --- CIFAR-10, the real images -----------------------------------------------------------------

def test_cifar10_test_split_index(cifar10_root):
    index = build_index("cifar10", "test", root=cifar10_root.parent)
    assert index.class_names == CIFAR10_CLASSES
    assert index.num_images == 10_000 == len(index.paths) == len(index.labels)
    assert index.labels.dtype == np.int64
    assert _per_class(index) == [1000] * 10
    assert np.all(np.diff(index.labels) >= 0)
    assert index.relative_paths()[:2] == ["airplane/0000.jpg", "airplane/0001.jpg"]
    assert index.relative_paths()[-1] == "truck/0999.jpg"
    assert all(Path(path).is_file() for path in index.paths[::997])
    again = build_index("cifar10", "test", root=cifar10_root.parent)
    assert again.paths == index.paths and np.array_equal(again.labels, index.labels)


def test_cifar10_per_class_subset_is_balanced_and_deterministic(cifar10_root):
    index = build_index("cifar10", "train", root=cifar10_root.parent, per_class=7)
    assert index.num_images == 70
    assert _per_class(index) == [7] * 10
    full = build_index("cifar10", "train", root=cifar10_root.parent)
    for label in range(10):
        first = [path for path, value in zip(full.paths, full.labels) if value == label][:7]
        assert [path for path, value in zip(index.paths, index.labels) if value == label] == first
    assert build_index("cifar10", "train", root=cifar10_root.parent, per_class=7).paths == index.paths
    limited = build_index("cifar10", "train", root=cifar10_root.parent, per_class=7, limit=10)
    assert _per_class(limited) == [1] * 10  # not the first 10 rows: those are one class
    assert limited.paths == [index.paths[7 * label] for label in range(10)]  # the first image of every class
    uneven = build_index("cifar10", "train", root=cifar10_root.parent, limit=25)
    assert sorted(_per_class(uneven)) == [2] * 5 + [3] * 5
    assert uneven.paths == sorted(uneven.paths, key=full.paths.index)  # rows keep the index order


# --- folder trees ------------------------------------------------------------------------------

def test_folder_tree_order_is_sorted_and_ignores_non_images(tmp_path):
    split = _tree(tmp_path / "data" / "pets" / "train", {"dog": ["b.png", "a.JPG"], "cat": ["z.jpeg", "y.bmp"]})
    (split / "cat" / "notes.txt").write_text("x")
    (split / "cat" / ".hidden.jpg").write_bytes(b"")
    _image(split / "cat" / "sub" / "x.png")
    (split / ".cache").mkdir()
    manifest = _manifest(tmp_path, "  pets: {format: folder, root: pets, splits: {train: train}}\n")

    index = build_index("pets", "train", manifest=manifest, root=tmp_path / "data")
    assert index.class_names == ["cat", "dog"]
    assert index.relative_paths() == ["cat/sub/x.png", "cat/y.bmp", "cat/z.jpeg", "dog/a.JPG", "dog/b.png"]
    assert index.labels.tolist() == [0, 0, 0, 1, 1]
    subset = build_index("pets", "train", manifest=manifest, root=tmp_path / "data", per_class=1)
    assert subset.relative_paths() == ["cat/sub/x.png", "dog/a.JPG"]


def test_images_in_sub_folders_of_a_class_count_in_it_with_one_warning(tmp_path, caplog):
    split = _tree(tmp_path / "data" / "pets" / "train", {"cat": ["a.png"], "dog": ["a.png"]})
    _image(split / "cat" / "kittens" / "b.png")
    _image(split / "cat" / "kittens" / "c.png")
    _image(split / "dog" / "old" / "d.png")
    manifest = _manifest(tmp_path, "  pets: {format: folder, root: pets, splits: {train: train}}\n")
    with caplog.at_level("WARNING", logger="pipeline.datasets"):
        index = build_index("pets", "train", manifest=manifest, root=tmp_path / "data")
    assert _per_class(index) == [3, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"images in 2 sub-folder(s) of class folders count in their class, e.g. {split / 'cat' / 'kittens'}: "
                        "move them up or out if they are not of that class"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.datasets"):
        flat = _tree(tmp_path / "flat", {"cat": ["a.png"], "dog": ["a.png"]})
        build_index("pets", "train", manifest=manifest, root=tmp_path / "data", split_dir=flat)
    assert not caplog.records, "no sub-folders, no warning"


def test_split_dir_override(tmp_path):
    elsewhere = _tree(tmp_path / "elsewhere", {"a": ["1.png"], "b": ["1.png", "2.png"]})
    manifest = _manifest(tmp_path, "  pets: {format: folder, root: pets, splits: {train: train}}\n")
    index = build_index("pets", "train", manifest=manifest, root=tmp_path / "nothing-here", split_dir=elsewhere)
    assert index.root == str(elsewhere)
    assert _per_class(index) == [1, 2]


def test_unknown_dataset_and_split_fail_before_work(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'foo': known datasets are .*cifar10.*; add an entry to data_manifest.yaml"):
        build_index("foo", "train", root=tmp_path)
    with pytest.raises(DatasetError, match="dataset 'cifar10' has no split 'validation': its splits are train, test"):
        build_index("cifar10", "validation", root=tmp_path)
    assert not any(tmp_path.iterdir()), "nothing may be unpacked for an unknown split"


def test_missing_folder_names_the_path_and_the_fix(tmp_path):
    manifest = _manifest(tmp_path, "  pets: {format: folder, root: pets, splits: {train: train}}\n")
    with pytest.raises(DatasetError) as info:
        build_index("pets", "train", manifest=manifest, root=tmp_path / "data")
    message = str(info.value)
    assert str(tmp_path / "data" / "pets" / "train") in message
    assert "DIFFREP_DATA" in message and "--data-root/--split-dir" in message
    assert isinstance(info.value, FileNotFoundError)


def test_empty_class_is_named(tmp_path):
    split = _tree(tmp_path / "pets" / "train", {"dog": ["a.png"], "cat": []})
    (split / "cat" / "readme.txt").write_text("no images here")
    manifest = _manifest(tmp_path, "  pets: {format: folder, root: pets, splits: {train: train}}\n")
    with pytest.raises(DatasetError, match=rf"class 'cat' in {split} has no images"):
        build_index("pets", "train", manifest=manifest, root=tmp_path)


def test_no_classes(tmp_path):
    split = tmp_path / "pets" / "train"
    split.mkdir(parents=True)
    _image(split / "loose.png")
    manifest = _manifest(tmp_path, "  pets: {format: folder, root: pets, splits: {train: train}}\n")
    with pytest.raises(DatasetError, match=rf"no class folders in {split}"):
        build_index("pets", "train", manifest=manifest, root=tmp_path)


@pytest.mark.parametrize("per_class, limit", [(0, None), (None, 0)])
def test_bad_sizes(tmp_path, per_class, limit):
    with pytest.raises(DatasetError, match="must be at least 1"):
        build_index("cifar10", "train", root=tmp_path, per_class=per_class, limit=limit)


# --- ImageNet-style subsets: class lists and label-fraction lists ------------------------------

def _imagenet(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    _tree(root / "train", {
        "n01": ["n01_1.JPEG", "n01_2.JPEG", "n01_3.JPEG"],
        "n02": ["n02_1.JPEG", "n02_2.JPEG"],
        "n03": ["n03_1.JPEG"],
    })
    _tree(root / "val", {"n01": ["v1.JPEG"], "n02": ["v2.JPEG"], "n03": ["v3.JPEG"]})
    (root / "lists").mkdir()
    return root


IMAGENET_ENTRIES = """\
  inet-frac:
    format: folder
    root: imagenet
    splits:
      train: {format: list, path: train, list: lists/frac.txt}
      val: val
  inet-2:
    format: folder
    root: imagenet
    classes: lists/two.txt
    splits: {train: train, val: val}
"""


def test_label_fraction_list_with_bare_imagenet_names(tmp_path):
    root = _imagenet(tmp_path)
    (root / "lists" / "frac.txt").write_text("n02_2.JPEG\nn01_3.JPEG\n\nn01_1.JPEG\n")
    manifest = _manifest(tmp_path, IMAGENET_ENTRIES)
    index = build_index("inet-frac", "train", manifest=manifest, root=tmp_path)
    assert index.class_names == ["n01", "n02"]
    assert index.relative_paths() == ["n01/n01_1.JPEG", "n01/n01_3.JPEG", "n02/n02_2.JPEG"]
    assert index.labels.tolist() == [0, 0, 1]
    assert build_index("inet-frac", "val", manifest=manifest, root=tmp_path).num_images == 3


def test_list_with_paths_and_explicit_classes(tmp_path):
    root = _imagenet(tmp_path)
    manifest = _manifest(tmp_path, IMAGENET_ENTRIES)
    (root / "lists" / "frac.txt").write_text("# comment\nn03/n03_1.JPEG 2\nn01/n01_2.JPEG 7\nn02/n02_1.JPEG 10\n")
    index = build_index("inet-frac", "train", manifest=manifest, root=tmp_path)
    assert index.class_names == ["2", "7", "10"]  # integer class names sort as numbers
    assert index.relative_paths() == ["n03/n03_1.JPEG", "n01/n01_2.JPEG", "n02/n02_1.JPEG"]
    (root / "lists" / "frac.txt").write_text("n03/n03_1.JPEG\nn01/n01_2.JPEG\n")
    assert build_index("inet-frac", "train", manifest=manifest, root=tmp_path).class_names == ["n01", "n03"]


def test_list_naming_missing_files_fails_before_work(tmp_path):
    root = _imagenet(tmp_path)
    (root / "lists" / "frac.txt").write_text("n01_1.JPEG\nn01_9.JPEG\n")
    with pytest.raises(DatasetError, match=r"1 of 2 images listed in .*frac.txt are missing, e.g. .*n01_9.JPEG"):
        build_index("inet-frac", "train", manifest=_manifest(tmp_path, IMAGENET_ENTRIES), root=tmp_path)


def test_class_list_restricts_classes(tmp_path):
    root = _imagenet(tmp_path)
    (root / "lists" / "two.txt").write_text("n03 third\nn01 first\n")
    manifest = _manifest(tmp_path, IMAGENET_ENTRIES)
    index = build_index("inet-2", "train", manifest=manifest, root=tmp_path)
    assert index.class_names == ["n01", "n03"]
    assert _per_class(index) == [3, 1]
    (root / "lists" / "two.txt").write_text("n01\nn09\n")
    with pytest.raises(DatasetError, match=r"class 'n09' listed in .*two.txt has no folder in"):
        build_index("inet-2", "val", manifest=manifest, root=tmp_path)


# --- fine-grained layouts ----------------------------------------------------------------------

def test_cub_layout(tmp_path):
    base = tmp_path / "CUB_200_2011"
    rows = [  # id, relative path, class id, is_training_image
        ("1", "002.Gull/g1.jpg", "2", "1"), ("2", "001.Albatross/a1.jpg", "1", "0"),
        ("3", "001.Albatross/a2.jpg", "1", "1"), ("4", "010.Wren/w1.jpg", "10", "1"),
    ]
    for _, relative, _, _ in rows:
        _image(base / "images" / relative)
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (base / "classes.txt").write_text("1 001.Albatross\n2 002.Gull\n10 010.Wren\n")
    manifest = _manifest(tmp_path, "  birds: {format: cub, root: CUB_200_2011, splits: {train: {key: 1}, test: {key: 0}}}\n")

    train = build_index("birds", "train", manifest=manifest, root=tmp_path)
    assert train.class_names == ["001.Albatross", "002.Gull", "010.Wren"]
    assert train.relative_paths() == ["images/001.Albatross/a2.jpg", "images/002.Gull/g1.jpg", "images/010.Wren/w1.jpg"]
    assert train.labels.tolist() == [0, 1, 2]
    test = build_index("birds", "test", manifest=manifest, root=tmp_path)
    assert test.class_names == train.class_names and test.labels.tolist() == [0]


def test_torchvision_layout_is_read_without_download(tmp_path):
    data = tmp_path / "fgvc-aircraft" / "fgvc-aircraft-2013b" / "data"
    _image(data / "images" / "0002.jpg")
    _image(data / "images" / "0001.jpg")
    _image(data / "images" / "0003.jpg")
    (data / "variants.txt").write_text("707-320\nA300B4\n")
    (data / "images_variant_trainval.txt").write_text("0002 A300B4\n0001 707-320\n0003 A300B4\n")
    manifest = load_manifest()
    index = build_index("aircraft", "train", manifest=manifest, root=tmp_path)
    assert index.class_names == ["707-320", "A300B4"]
    assert [Path(path).name for path in index.paths] == ["0001.jpg", "0002.jpg", "0003.jpg"]
    assert index.labels.tolist() == [0, 1, 1]
    with pytest.raises(DatasetError, match=r"dataset 'aircraft' split 'test'.*cannot read"):
        build_index("aircraft", "test", manifest=manifest, root=tmp_path)
    with pytest.raises(DatasetError, match=r"folder .*fgvc-aircraft does not exist; set DIFFREP_DATA"):
        build_index("aircraft", "train", manifest=manifest, root=tmp_path / "empty")


def test_stanford_dogs_reads_its_mat_split_lists(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "stanford-dogs"
    names = ["n02085620-Chihuahua/a.jpg", "n02085620-Chihuahua/b.jpg", "n02086240-Shih-Tzu/c.jpg"]
    for name in names:
        _image(root / "Images" / name)
    (root / "lists").mkdir()
    savemat(str(root / "lists" / "train_list.mat"), {"file_list": np.array(names, dtype=object)})
    savemat(str(root / "lists" / "test_list.mat"), {"file_list": np.array(names[2:], dtype=object)})
    train = build_index("dogs", "train", root=tmp_path)
    assert train.class_names == ["n02085620-Chihuahua", "n02086240-Shih-Tzu"]
    assert [Path(p).name for p in train.paths] == ["a.jpg", "b.jpg", "c.jpg"] and train.labels.tolist() == [0, 0, 1]
    test = build_index("dogs", "test", root=tmp_path)
    assert [Path(p).name for p in test.paths] == ["c.jpg"]
