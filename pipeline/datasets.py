"""Dataset indexing: the reproducible list of (image path, label) of one split, checked before any work starts.

:func:`build_index` turns a manifest entry into an :class:`ImageIndex` whose order is stable
(classes sorted, files sorted within a class), so an image's row is its id in the feature
cache on every machine. Every problem that would stop a run (unknown dataset or split, missing
folder, class without images, no classes) is raised here as one :class:`DatasetError`, before
any image is decoded. A dataset still packed in its source archive is unpacked first
(:func:`pipeline.archives.ensure_unpacked`), or, in a dry run, read from the archive's listing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from extract.inputs.images import IMAGE_EXTENSIONS

from pipeline.archives import WHERE_HINT, ArchiveTree, DiskTree, ensure_unpacked, listed_archive
from pipeline.errors import DatasetError
from pipeline.names import check_name
from pipeline.manifest import TORCHVISION_LOADERS, DatasetSpec, Manifest, SplitSpec, get_dataset

__all__ = ["ImageIndex", "build_index", "select_subset"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ImageIndex:
    """The images of one dataset split in their reproducible order; row i is image id i.

    Attributes:
        dataset: dataset name.
        split: split name.
        root: folder that :meth:`relative_paths` are relative to (the split's folder).
        paths: absolute image paths, one per row.
        labels: int64 array ``(num_images,)``, indices into ``class_names``.
        class_names: class name of each label.
        pending_unpack: ``(archive, destination folder, bytes)`` when the images are still packed
            (an index built with ``unpack=False`` from the archive's listing), else None.
    """

    dataset: str
    split: str
    root: str
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    pending_unpack: tuple[str, str, int] | None = None

    @property
    def num_images(self) -> int:
        """Number of rows."""
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of classes (labels run from 0 to num_classes - 1)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def relative_paths(self) -> list[str]:
        """Paths relative to :attr:`root` (POSIX separators), for storing with a cache."""
        return [Path(os.path.relpath(path, self.root)).as_posix() for path in self.paths]

    def subset(self, rows: Sequence[int] | np.ndarray) -> "ImageIndex":
        """The given rows, in the given order, with the same classes.

        Args:
            rows: row numbers of this index.

        Returns:
            A new :class:`ImageIndex`.
        """
        rows = np.asarray(rows, dtype=np.int64)
        return ImageIndex(
            dataset=self.dataset, split=self.split, root=self.root,
            paths=[self.paths[i] for i in rows], labels=self.labels[rows].copy(),
            class_names=list(self.class_names), pending_unpack=self.pending_unpack,
        )


# ---------------------------------------------------------------------------------------------
# One reader per layout: each returns (paths, labels, class_names) with paths grouped by label.

Entries = tuple[list[str], list[int], list[str]]


def _read_class_list(path: Path) -> list[str]:
    """Class names from a class-list file: the first word of each non-empty, non-# line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read class-list file {path} ({exc.strerror or exc}): {WHERE_HINT}") from exc
    names = [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise DatasetError(f"class-list file {path} names no classes: write one class folder name per line")
    return sorted(set(names))


def _read_folder(spec: DatasetSpec, split: SplitSpec, tree: DiskTree | ArchiveTree = DiskTree()) -> Entries:
    """Class-per-folder tree: classes are the sorted sub-folders (or the class list), files sorted within each.

    Images in sub-folders of a class folder count in that class (one warning names such a folder).
    """
    path = split.path
    present = tree.subfolders(path)
    if spec.classes_file is not None:
        class_names = _read_class_list(spec.classes_file)
        for name in class_names:
            if name not in present:
                raise DatasetError(f"class '{name}' listed in {spec.classes_file} has no folder in {path}: fix the list or the tree")
    else:
        class_names = present
    if not class_names:
        raise DatasetError(f"no class folders in {path}: a folder dataset needs one sub-folder of images per class")
    paths: list[str] = []
    labels: list[int] = []
    nested: set[str] = set()
    for label, name in enumerate(class_names):
        files = tree.images_under(path / name)
        if not files:
            raise DatasetError(
                f"class '{name}' in {path} has no images: add images ({', '.join(IMAGE_EXTENSIONS[:3])} ...) or remove the folder"
            )
        nested.update(os.path.dirname(f) for f in files if os.path.dirname(f) != str(path / name))
        paths.extend(files)
        labels.extend([label] * len(files))
    if nested:
        logger.warning(
            "images in %d sub-folder(s) of class folders count in their class, e.g. %s: move them up or out "
            "if they are not of that class", len(nested), sorted(nested)[0])
    return paths, labels, class_names


def _sorted_class_names(names: set[str]) -> list[str]:
    """Class names sorted; numerically when all of them are integers."""
    if names and all(name.isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _group(spec: DatasetSpec, where: Path, samples: list[tuple[str, str]]) -> Entries:
    """(path, class name) pairs -> entries sorted by (class, path), restricted to the class list."""
    present = {name for _, name in samples}
    if spec.classes_file is not None:
        class_names = _read_class_list(spec.classes_file)
        for name in class_names:
            if name not in present:
                raise DatasetError(f"class '{name}' in {where} has no images: fix {spec.classes_file} or the data")
    else:
        class_names = _sorted_class_names(present)
    if not class_names:
        raise DatasetError(f"no classes in {where}: check the dataset's files and its manifest entry")
    label_of = {name: label for label, name in enumerate(class_names)}
    kept = sorted((label_of[name], path) for path, name in samples if name in label_of)
    return [path for _, path in kept], [label for label, _ in kept], class_names


def _read_list(spec: DatasetSpec, split: SplitSpec) -> Entries:
    """Image list file: ``<path> [<class>]`` per line, paths relative to the split folder."""
    list_file = split.list_file
    assert list_file is not None, "the manifest check guarantees a list file"
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read image list {list_file} ({exc.strerror or exc}): {WHERE_HINT}") from exc
    samples = []
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        relative = words[0]
        if len(words) > 1:
            name = words[1]
        elif "/" in relative:
            name = relative.split("/", 1)[0]
        else:
            name = relative.split("_", 1)[0]
            relative = f"{name}/{relative}"
        samples.append((str(split.path / relative), name))
    if not samples:
        raise DatasetError(f"image list {list_file} names no images: write one '<path> [<class>]' per line")
    missing = [path for path, _ in samples if not os.path.isfile(path)]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(samples)} images listed in {list_file} are missing, e.g. {missing[0]}: {WHERE_HINT}"
        )
    return _group(spec, list_file, samples)


def _read_words(path: Path) -> list[list[str]]:
    """Lines of a CUB-style metadata file split into (id, rest); lines without both are skipped."""
    try:
        return [words for words in (line.split(maxsplit=1) for line in path.read_text(encoding="utf-8").splitlines()) if len(words) == 2]
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc.strerror or exc}): {WHERE_HINT}") from exc


def _read_cub(spec: DatasetSpec, split: SplitSpec) -> Entries:
    """CUB-200-2011 / NABirds metadata; labels follow the numeric class ids present in image_class_labels.txt."""
    base = split.path
    if split.key not in ("0", "1"):
        raise DatasetError(f"dataset '{spec.name}' split '{split.name}' needs key 1 (train) or 0 (test) in the manifest")
    images = {words[0]: words[1].strip() for words in _read_words(base / "images.txt")}
    class_of = {words[0]: words[1].strip() for words in _read_words(base / "image_class_labels.txt")}
    in_split = {words[0] for words in _read_words(base / "train_test_split.txt") if words[1].strip() == split.key}
    names = {words[0]: words[1].strip() for words in _read_words(base / "classes.txt")}
    class_ids = sorted(set(class_of.values()), key=lambda value: (len(value), value))
    if not class_ids:
        raise DatasetError(f"no classes in {base / 'image_class_labels.txt'}: check the dataset's files")
    label_of = {class_id: label for label, class_id in enumerate(class_ids)}
    class_names = [names.get(class_id, class_id) for class_id in class_ids]
    rows = sorted((label_of[class_of[image_id]], images[image_id]) for image_id in in_split if image_id in class_of)
    if not rows:
        raise DatasetError(f"no images with is_training_image={split.key} in {base / 'train_test_split.txt'}: check the dataset's files")
    samples = [(str(base / "images" / relative), class_names[label]) for label, relative in rows]
    if spec.classes_file is not None:
        return _group(spec, base, samples)
    return [path for path, _ in samples], [label for label, _ in rows], class_names


def _read_torchvision(spec: DatasetSpec, split: SplitSpec) -> Entries:
    """A torchvision dataset built with download=False, read for its (path, label) pairs only."""
    import torchvision.datasets

    if spec.loader not in TORCHVISION_LOADERS:  # never getattr on a name the manifest did not pass
        raise DatasetError(f"dataset '{spec.name}' has unknown loader {str(spec.loader)[:60]!r}: use one of "
                           f"{', '.join(TORCHVISION_LOADERS)} in the manifest")
    loader = getattr(torchvision.datasets, spec.loader, None)
    if loader is None:
        raise DatasetError(f"dataset '{spec.name}': this torchvision has no datasets.{spec.loader}: upgrade torchvision")
    kwargs = dict(spec.options)
    if split.key is not None:
        kwargs["split"] = split.key
    try:
        dataset = loader(root=str(spec.root), download=False, **kwargs)
    except ImportError as exc:
        raise DatasetError(f"dataset '{spec.name}' is read by torchvision.datasets.{spec.loader}, which needs {exc.name}: install it") from exc
    except (RuntimeError, OSError, ValueError) as exc:
        raise DatasetError(
            f"dataset '{spec.name}' split '{split.name}': torchvision.datasets.{spec.loader} cannot read {spec.root} "
            f"({' '.join(str(exc).split())}); {WHERE_HINT}"
        ) from exc
    if hasattr(dataset, "_samples"):
        pairs = [(str(path), int(label)) for path, label in dataset._samples]
    elif hasattr(dataset, "_image_files") and hasattr(dataset, "_labels"):
        pairs = [(str(path), int(label)) for path, label in zip(dataset._image_files, dataset._labels)]
    elif hasattr(dataset, "samples"):
        pairs = [(str(path), int(label)) for path, label in dataset.samples]
    else:
        raise DatasetError(f"diffrep cannot list the files of torchvision.datasets.{spec.loader}: use format folder or list for '{spec.name}'")
    count = max((label for _, label in pairs), default=-1) + 1
    classes = list(getattr(dataset, "classes", None) or [str(label) for label in range(count)])
    samples = [(path, classes[label]) for path, label in pairs]
    if spec.classes_file is not None:
        return _group(spec, spec.root, samples)
    rows = sorted((label, path) for path, label in pairs)
    if not rows:
        raise DatasetError(f"dataset '{spec.name}' split '{split.name}' has no images under {spec.root}: {WHERE_HINT}")
    return [path for _, path in rows], [label for label, _ in rows], classes


def _read_stanford_dogs(spec: DatasetSpec, split: SplitSpec) -> Entries:
    """Stanford Dogs: lists/<key>_list.mat names files under Images/<breed folder>/."""
    list_file = split.path / "lists" / f"{split.key}_list.mat"
    if not list_file.is_file():
        raise DatasetError(f"dataset '{spec.name}' split '{split.name}': {list_file} does not exist; {WHERE_HINT}")
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise DatasetError(f"dataset '{spec.name}' keeps its splits in .mat files, which need scipy: install scipy") from exc
    content = loadmat(str(list_file), squeeze_me=True)
    samples = []
    for relative in np.atleast_1d(content["file_list"]):
        relative = str(relative)
        samples.append((str(split.path / "Images" / relative), relative.split("/", 1)[0]))
    return _group(spec, list_file, samples)


_READERS = {
    "folder": _read_folder,
    "list": _read_list,
    "cub": _read_cub,
    "torchvision": _read_torchvision,
    "stanford_dogs": _read_stanford_dogs,
}


# ---------------------------------------------------------------------------------------------

def _take_per_class(labels: np.ndarray, per_class: int, class_names: list[str]) -> np.ndarray:
    """Rows of the first ``per_class`` images of every class, in index order."""
    rows = []
    seen = np.zeros(len(class_names), dtype=np.int64)
    for row, label in enumerate(labels):
        if seen[label] < per_class:
            rows.append(row)
            seen[label] += 1
    short = [class_names[label] for label in np.flatnonzero(seen < per_class)]
    if short:
        logger.warning("%d classes have fewer than %d images (e.g. '%s'): they keep all they have", len(short), per_class, short[0])
    return np.asarray(rows, dtype=np.int64)


def _take_balanced(labels: np.ndarray, limit: int) -> np.ndarray:
    """``limit`` rows spread over every class: the first image of each class, then the second, ... (sorted).

    Indexes are sorted by class, so the first ``limit`` rows would cover only the first classes.
    """
    rank = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rank[rows] = np.arange(len(rows))
    order = np.lexsort((labels, rank))  # by rank within the class, then by class
    return np.sort(order[:limit])


def select_subset(index: ImageIndex, per_class: int | None = None, limit: int | None = None) -> ImageIndex:
    """The rows ``build_index`` keeps for ``per_class`` (the first n of every class) and then ``limit``
    (n rows, class-balanced: the first image of every class, then the second, ...), in index order.

    Raises:
        DatasetError: a ``per_class`` or ``limit`` below 1.
    """
    for label, value in (("per_class", per_class), ("limit", limit)):
        if value is not None and value < 1:
            raise DatasetError(f"{label} must be at least 1, got {value}: pass a positive number or leave it out")
    if per_class is not None:
        index = index.subset(_take_per_class(index.labels, per_class, index.class_names))
    if limit is not None and limit < index.num_images:
        index = index.subset(_take_balanced(index.labels, limit))
    return index


def build_index(
    dataset_name: str,
    split: str,
    *,
    manifest: Manifest | None = None,
    root: str | os.PathLike | None = None,
    split_dir: str | os.PathLike | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    unpack: bool = True,
) -> ImageIndex:
    """List the images of one dataset split in their reproducible order, checking everything first.

    The order is: classes sorted by name (numerically for integer names), and within a class
    the files sorted by path; ``per_class`` then keeps the first n images of each class, and
    ``limit`` n rows spread evenly over the classes (the first images of each). A dataset with a source archive (cifar10) is
    unpacked into the data root on first use.

    Args:
        dataset_name: name in the manifest, e.g. ``cifar10``.
        split: split name, e.g. ``train`` or ``test``.
        manifest: a loaded manifest; None loads the default one.
        root: the data root (``--data-root``); None uses ``$DIFFREP_DATA`` or ``~/.cache/diffrep/data``.
        split_dir: the split's folder (``--split-dir``), overriding the manifest.
        per_class: keep the first n images of every class (a deterministic class-balanced subset).
        limit: keep n rows (after ``per_class``), class-balanced: the first images of every class; for quick runs.
        unpack: unpack a packed dataset into the data root; False (a dry run) writes nothing and
            lists the archive instead: the index then names the files as they would be unpacked
            and ``pending_unpack`` says what would be unpacked where.

    Returns:
        The :class:`ImageIndex`.

    Raises:
        DatasetError: unknown dataset or split, missing folder or file, a class without images,
            no classes, or a ``per_class``/``limit`` below 1; BadNameError: a dataset or split name that
            cannot be a folder name.
    """
    check_name(split, "split")
    for label, value in (("per_class", per_class), ("limit", limit)):
        if value is not None and value < 1:
            raise DatasetError(f"{label} must be at least 1, got {value}: pass a positive number or leave it out")
    overrides: dict[str, object] = {}
    if root is not None:
        overrides["data_root"] = root
    if split_dir is not None:
        overrides["split_dirs"] = {split: split_dir}
    spec = get_dataset(dataset_name, manifest, overrides)
    split_spec = spec.split(split)
    if split_spec.format not in _READERS:  # instance sets (coco, pets_instances) are read by pipeline.instances
        raise DatasetError(f"dataset '{dataset_name}' holds instances (format {split_spec.format}), not one class per "
                           f"image: use it with diffrep detect")

    pending = None
    tree: DiskTree | ArchiveTree = DiskTree()
    if spec.source_archive is not None and split_dir is None and not spec.root.exists():
        if unpack:
            ensure_unpacked(spec.source_archive, spec.data_root, spec.root.name)
        else:
            pending, tree = listed_archive(dataset_name, spec, split_spec)
    if pending is None and not split_spec.path.is_dir():
        raise DatasetError(f"dataset '{dataset_name}' split '{split}': folder {split_spec.path} does not exist; {WHERE_HINT}")

    if pending is None:
        paths, labels, class_names = _READERS[split_spec.format](spec, split_spec)
    else:
        paths, labels, class_names = _read_folder(spec, split_spec, tree)
    index = ImageIndex(
        dataset=dataset_name, split=split, root=str(split_spec.path),
        paths=[str(path) for path in paths], labels=np.asarray(labels, dtype=np.int64),
        class_names=list(class_names), pending_unpack=pending,
    )
    index = select_subset(index, per_class=per_class, limit=limit)
    logger.info("%s/%s: %d images in %d classes", dataset_name, split, index.num_images, index.num_classes)
    return index
