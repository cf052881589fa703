"""Dense (per-pixel) datasets: images and label maps paired by file stem, a class list and an ignore index.

The ``segmentation:`` section of ``data_manifest.yaml`` names each dataset once (camvid, pets-seg,
pets-seg-breeds, ade20k); :func:`get_dense_dataset` resolves an entry against the data root and
the shared folder, unpacking its source archive once as ``pipeline.archives`` does for CIFAR-10;
:func:`build_dense_index` lists one split as a :class:`DenseIndex`. Every label map is read
through the entry's lookup table into class ids ``0..K-1`` with one ignore value, :data:`IGNORE`
(CamVid's void 11, the pets' trimap boundary 3, ADE20K's 0 all become 255), so nothing downstream
knows a dataset's own coding. Self-contained on purpose: detection reuses the pets reader.

Entry schema (``segmentation: <name>: ...``)::

    description:    one line
    root:           the dataset's folder, relative to the data root (or absolute)
    source_archive: optional tarball relative to the shared folder, unpacked into the data root once
    classes:        list of class names (ids 0..K-1), or classes_file: a file under root, one name a line
                    (a "<id> <name>" or tab-separated table keeps its last column)
    label_values:   how raw label pixel values become class ids: "identity" (value = id, values >= K
                    ignored), "minus-one" (0 ignored, v -> v - 1: ADE20K), or a mapping {raw: id | ignore}
                    (raw values not named are ignored)
    foreground:     optional "list-class": the mapping's class "pet" becomes the image's class read from the
                    split list (second column), one class per list class id, named by the stem's prefix
    splits:         <split>: {images: <folder>, labels: <folder>, list: <file of stems, optional>}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml
from PIL import Image

from extract.inputs.images import IMAGE_EXTENSIONS

from pipeline.archives import WHERE_HINT, ensure_unpacked
from pipeline.errors import DatasetError
from pipeline.manifest import default_data_root, default_manifest_path, default_shared_dir
from pipeline.names import check_name

__all__ = ["IGNORE", "DenseSplit", "DenseDatasetSpec", "DenseIndex", "dense_dataset_names", "get_dense_dataset",
           "build_dense_index", "read_label_map"]

IGNORE = 255
"""The one ignore value of every label map this module returns (void, boundary, unlabelled)."""

_ENTRY_KEYS = {"description", "root", "source_archive", "classes", "classes_file", "label_values", "foreground", "splits",
               "absent_hint"}


@dataclass(frozen=True)
class DenseSplit:
    """One split: its image folder, label folder and optional stem list (absolute paths)."""

    name: str
    images: Path
    labels: Path
    list_file: Path | None = None


@dataclass(frozen=True)
class DenseDatasetSpec:
    """One dense dataset resolved for this machine.

    Attributes:
        name, description: from the manifest. root: the dataset's folder; data_root: where it was looked for.
        source_archive: tarball unpacked into ``data_root`` when ``root`` is missing, else None.
        class_names: class id -> name (before any per-image foreground classes are added).
        lookup: uint8 ``(256,)`` table raw label value -> class id or :data:`IGNORE`.
        foreground: None, or ``(raw value, class id)`` replaced per image by its list class ("list-class").
        splits: split name -> :class:`DenseSplit`. absent_hint: what to do when the data is not here.
    """

    name: str
    description: str
    root: Path
    data_root: Path
    source_archive: Path | None
    class_names: tuple[str, ...]
    lookup: np.ndarray = field(repr=False, compare=False)
    foreground: tuple[int, int] | None
    splits: Mapping[str, DenseSplit]
    absent_hint: str = ""

    def split(self, name: str) -> DenseSplit:
        if name not in self.splits:
            raise DatasetError(f"dense dataset '{self.name}' has no split '{name}': its splits are {', '.join(self.splits)}")
        return self.splits[name]


@dataclass(frozen=True)
class DenseIndex:
    """The (image, label map) pairs of one split in a fixed order (stems sorted); row i is image id i.

    Attributes:
        dataset, split: names. stems: file stems. image_paths, label_paths: absolute paths.
        class_names: class id -> name (K classes; label maps hold 0..K-1 and :data:`IGNORE`).
        image_classes: int64 ``(N,)`` one class per image for stratified row orders (the list class, else 0).
        image_class_names: names of ``image_classes``.
        lookup: the raw -> class table; fg_class: per-image class of the foreground value (None: no remap).
    """

    dataset: str
    split: str
    stems: list[str]
    image_paths: list[str]
    label_paths: list[str]
    class_names: list[str]
    image_classes: np.ndarray
    image_class_names: list[str]
    lookup: np.ndarray = field(repr=False)
    foreground: tuple[int, int] | None = None
    fg_classes: np.ndarray | None = field(default=None, repr=False)

    ignore_index: int = IGNORE

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read_label(self, row: int) -> np.ndarray:
        """Row ``row``'s label map at its own resolution: uint8 ``(H, W)`` class ids, :data:`IGNORE` where ignored."""
        fg = None
        if self.foreground is not None and self.fg_classes is not None:
            fg = (self.foreground[0], int(self.fg_classes[row]))
        return read_label_map(self.label_paths[row], self.lookup, fg)

    def subset(self, rows: Sequence[int]) -> "DenseIndex":
        """The given rows in the given order."""
        rows = [int(r) for r in rows]
        return DenseIndex(
            dataset=self.dataset, split=self.split, stems=[self.stems[r] for r in rows],
            image_paths=[self.image_paths[r] for r in rows], label_paths=[self.label_paths[r] for r in rows],
            class_names=self.class_names, image_classes=self.image_classes[rows], image_class_names=self.image_class_names,
            lookup=self.lookup, foreground=self.foreground,
            fg_classes=None if self.fg_classes is None else self.fg_classes[rows],
        )

    def limited(self, limit: int | None) -> "DenseIndex":
        """``limit`` rows spread evenly over the index (every k-th image; all when None or larger)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise DatasetError(f"--limit {limit} must be at least 1")
        return self.subset(np.linspace(0, len(self) - 1, limit).round().astype(int).tolist())


def read_label_map(path: str | os.PathLike, lookup: np.ndarray, foreground: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one label PNG (single channel, value = raw code) into class ids through ``lookup``.

    Args:
        path: the label file. lookup: uint8 ``(256,)`` raw value -> class id or IGNORE.
        foreground: ``(raw value, class id)``: pixels of that raw value get that class (per-image classes).

    Returns:
        uint8 ``(H, W)``.

    Raises:
        DatasetError: unreadable file, or a colour (RGB) label map.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "1"):
                raise DatasetError(f"label map {path} has mode {image.mode}: expected one channel of class codes")
            raw = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read label map {path} ({' '.join(str(exc).split())}): restore the file") from exc
    raw = np.clip(raw, 0, 255).astype(np.uint8) if raw.dtype != np.uint8 else raw
    out = lookup[raw]
    if foreground is not None:
        out[raw == foreground[0]] = foreground[1]
    return out


def _load_section(path: Path | None) -> tuple[Path, Mapping[str, Any]]:
    path = Path(path).expanduser() if path is not None else default_manifest_path()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"cannot read data manifest {path} ({' '.join(str(exc).split())}): fix it or set DIFFREP_MANIFEST") from exc
    section = (document or {}).get("segmentation") or {}
    if not isinstance(section, Mapping):
        raise DatasetError(f"{path}: 'segmentation' must map dataset names to entries")
    return path, section


def dense_dataset_names(manifest: str | os.PathLike | None = None) -> list[str]:
    """Names of the manifest's dense datasets, sorted."""
    return sorted(_load_section(Path(manifest) if manifest else None)[1])


def _lookup(label_values: Any, num_classes: int, where: str) -> tuple[np.ndarray, dict[int, int]]:
    table = np.full(256, IGNORE, dtype=np.uint8)
    if label_values in (None, "identity"):
        table[:num_classes] = np.arange(num_classes, dtype=np.uint8)
        return table, {}
    if label_values == "minus-one":
        table[1:num_classes + 1] = np.arange(num_classes, dtype=np.uint8)
        return table, {}
    if not isinstance(label_values, Mapping):
        raise DatasetError(f"{where}: label_values must be identity, minus-one or a mapping {{raw: class id | ignore}}")
    named = {}
    for raw, value in label_values.items():
        if value == "ignore":
            continue
        if not (0 <= int(raw) < 256 and 0 <= int(value) < num_classes):
            raise DatasetError(f"{where}: label_values {raw}: {value} is out of range (raw 0-255, class 0-{num_classes - 1})")
        table[int(raw)] = int(value)
        named[int(raw)] = int(value)
    return table, named


def get_dense_dataset(name: str, *, manifest: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                      shared_dir: str | os.PathLike | None = None, unpack: bool = True) -> DenseDatasetSpec:
    """Resolve one ``segmentation:`` entry for this machine, unpacking its source archive on first use.

    Raises:
        DatasetError: unknown dataset, a bad entry, or the data is not here (one line saying where it is
            looked for and what to do).
    """
    check_name(name, "dataset")
    path, section = _load_section(Path(manifest) if manifest else None)
    if name not in section:
        raise DatasetError(f"unknown dense dataset '{name}': known are {', '.join(sorted(section)) or 'none'} "
                           f"(the segmentation section of {path.name})")
    entry = section[name]
    where = f"{path}: segmentation dataset '{name}'"
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise DatasetError(f"{where} has unknown key(s) {', '.join(unknown)}: allowed are {', '.join(sorted(_ENTRY_KEYS))}")
    root_dir = Path(data_root).expanduser() if data_root else default_data_root()
    shared = Path(shared_dir).expanduser() if shared_dir else default_shared_dir()
    root = Path(str(entry["root"])).expanduser()
    root = root if root.is_absolute() else root_dir / root
    archive = shared / str(entry["source_archive"]) if entry.get("source_archive") else None
    if not root.is_dir():
        if archive is None:
            hint = entry.get("absent_hint") or f"put it at {root}"
            raise DatasetError(f"dense dataset '{name}' is not here ({root} does not exist): {hint}; {WHERE_HINT}")
        if not unpack:
            raise DatasetError(f"dense dataset '{name}' is still packed in {archive}: run once without --dry-run")
        ensure_unpacked(archive, root_dir, root.name)
    if "classes" in entry:
        classes = [str(c) for c in entry["classes"]]
    elif "classes_file" in entry:
        classes = _read_classes(root / str(entry["classes_file"]), where)
    else:
        raise DatasetError(f"{where} has no classes or classes_file: add one")
    lookup, named = _lookup(entry.get("label_values"), len(classes), where)
    foreground = None
    if entry.get("foreground") == "list-class":
        pet = [raw for raw, cls in named.items() if classes[cls] == "pet"]
        if not pet:
            raise DatasetError(f"{where}: foreground list-class needs a class named 'pet' in label_values")
        foreground = (pet[0], named[pet[0]])
    splits = {}
    for split_name, raw in (entry.get("splits") or {}).items():
        check_name(split_name, f"{where} split")
        splits[str(split_name)] = DenseSplit(
            name=str(split_name), images=root / str(raw["images"]), labels=root / str(raw["labels"]),
            list_file=root / str(raw["list"]) if raw.get("list") else None)
    return DenseDatasetSpec(name=name, description=str(entry.get("description", "")), root=root, data_root=root_dir,
                            source_archive=archive, class_names=tuple(classes), lookup=lookup, foreground=foreground,
                            splits=splits, absent_hint=str(entry.get("absent_hint", "")))


def _read_classes(path: Path, where: str) -> list[str]:
    """One class a line; tables (``<id> <name>`` or tab-separated with a header) keep their last column."""
    if not path.is_file():
        raise DatasetError(f"{where}: class file {path} is missing: restore it or list the classes in the manifest")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and "\t" in lines[0] and not lines[0].split("\t")[0].strip().isdigit():
        lines = lines[1:]  # a header row (ADE20K's objectInfo150.txt)
    names = []
    for line in lines:
        parts = line.split("\t") if "\t" in line else line.split(None, 1)
        names.append(parts[-1].split(";")[0].strip() if len(parts) > 1 else parts[0])
    return names


def build_dense_index(name: str, split: str, *, data_root: str | os.PathLike | None = None,
                      manifest: str | os.PathLike | None = None, limit: int | None = None,
                      unpack: bool = True) -> DenseIndex:
    """List one split's (image, label map) pairs, checked before any pixel is decoded.

    Images pair with ``<labels>/<stem>.png`` by file stem; with a list file only its stems are used
    (first column; the second is the image's class for ``foreground: list-class``). Stems are sorted.

    Args:
        name, split: the dataset and split. data_root: ``--data-root`` (default ``$DIFFREP_DATA``).
        limit: keep n images spread evenly over the split. unpack: unpack the source archive when needed.

    Raises:
        DatasetError: unknown dataset or split, data not here (one line saying where it is looked for),
            an image without its label map, or an empty split.
    """
    spec = get_dense_dataset(name, manifest=manifest, data_root=data_root, unpack=unpack)
    part = spec.split(split)
    for folder in (part.images, part.labels):
        if not folder.is_dir():
            raise DatasetError(f"dense dataset '{name}' split '{split}': folder {folder} is missing; {WHERE_HINT}")
    images = {}
    for entry in os.scandir(part.images):
        stem, ext = os.path.splitext(entry.name)
        if entry.is_file() and not entry.name.startswith(".") and ext.lower() in IMAGE_EXTENSIONS:
            images.setdefault(stem, entry.path)
    listed: dict[str, str] = {}
    if part.list_file is not None:
        if not part.list_file.is_file():
            raise DatasetError(f"dense dataset '{name}' split '{split}': list {part.list_file} is missing; {WHERE_HINT}")
        for line in part.list_file.read_text(encoding="utf-8").splitlines():
            fields = line.split()
            if fields and not fields[0].startswith("#"):
                listed[fields[0]] = fields[1] if len(fields) > 1 else "0"
        stems = sorted(listed)
        absent = [stem for stem in stems if stem not in images]
        if absent:
            raise DatasetError(f"dense dataset '{name}' split '{split}': {len(absent)} listed image(s) missing from "
                               f"{part.images}, e.g. {absent[0]}: restore them")
    else:
        stems = sorted(images)
    if not stems:
        raise DatasetError(f"dense dataset '{name}' split '{split}' has no images in {part.images}; {WHERE_HINT}")
    labels = [str(part.labels / f"{stem}.png") for stem in stems]
    unlabelled = [stem for stem, path in zip(stems, labels) if not os.path.isfile(path)]
    if unlabelled:
        raise DatasetError(f"dense dataset '{name}' split '{split}': {len(unlabelled)} image(s) have no label map "
                           f"<stem>.png in {part.labels}, e.g. {unlabelled[0]}: restore them or list only labelled images")
    class_names = list(spec.class_names)
    image_classes = np.zeros(len(stems), dtype=np.int64)
    image_class_names = ["image"]
    fg_classes = None
    if listed:
        ids = sorted({int(v) for v in listed.values()})
        prefix = {int(listed[s]): s.rsplit("_", 1)[0] for s in stems}
        image_class_names = [prefix[i] for i in ids]
        image_classes = np.array([ids.index(int(listed[s])) for s in stems], dtype=np.int64)
        if spec.foreground is not None:
            fg_id = spec.foreground[1]
            base = [c for i, c in enumerate(class_names) if i != fg_id]
            fg_classes = len(base) + image_classes
            class_names = base + image_class_names
            remap = np.arange(256, dtype=np.uint8)
            kept = [i for i in range(len(spec.class_names)) if i != fg_id]
            for new, old in enumerate(kept):
                remap[old] = new
            lookup = remap[spec.lookup]
            lookup[spec.lookup == IGNORE] = IGNORE
            index = DenseIndex(dataset=name, split=split, stems=stems, image_paths=[images[s] for s in stems],
                               label_paths=labels, class_names=class_names, image_classes=image_classes,
                               image_class_names=image_class_names, lookup=lookup, foreground=spec.foreground,
                               fg_classes=fg_classes)
            return index.limited(limit)
    index = DenseIndex(dataset=name, split=split, stems=stems, image_paths=[images[s] for s in stems], label_paths=labels,
                       class_names=class_names, image_classes=image_classes, image_class_names=image_class_names,
                       lookup=spec.lookup)
    return index.limited(limit)
