"""The data manifest: which datasets exist, how their files are laid out, and where they live on this machine.

``data_manifest.yaml`` (at the repository top level) names each dataset once; this module
reads and checks it (:func:`load_manifest`) and resolves one entry against the data root,
the shared folder and the user's overrides into a :class:`DatasetSpec` of absolute paths
(:func:`get_dataset`). Nothing here touches image files; :mod:`pipeline.datasets` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.errors import DatasetError
from pipeline.names import check_name

__all__ = [
    "FORMATS",
    "TORCHVISION_LOADERS",
    "Manifest",
    "SplitSpec",
    "DatasetSpec",
    "repo_root",
    "default_manifest_path",
    "default_data_root",
    "default_shared_dir",
    "load_manifest",
    "get_dataset",
]

#: Layouts a manifest entry may name (see the header of data_manifest.yaml).
FORMATS = ("folder", "list", "cub", "torchvision", "stanford_dogs",
           "coco", "pets_instances")  # instance formats: read by pipeline.instances (detection)

#: torchvision.datasets classes the ``torchvision`` format reads (those that list their image files and labels).
TORCHVISION_LOADERS = ("Country211", "DTD", "FGVCAircraft", "Flowers102", "Food101", "GTSRB", "Imagenette",
                       "RenderedSST2", "StanfordCars", "SUN397")
#: Loader keyword arguments the manifest may not set: diffrep passes them itself (never downloading).
_RESERVED_OPTIONS = ("download", "root", "split")

_DATASET_KEYS = {"description", "format", "root", "source_archive", "classes", "loader", "options", "splits"}
_SPLIT_KEYS = {"path", "format", "list", "key"}
_OVERRIDE_KEYS = {"data_root", "shared_dir", "root", "split_dirs", "lists", "classes"}


def repo_root() -> Path:
    """The folder holding ``data_manifest.yaml`` and the packages (the repository checkout)."""
    return Path(__file__).resolve().parents[1]


def default_manifest_path() -> Path:
    """``$DIFFREP_MANIFEST``, else ``data_manifest.yaml`` at the repository top level."""
    env = os.environ.get("DIFFREP_MANIFEST")
    return Path(env).expanduser() if env else repo_root() / "data_manifest.yaml"


def default_data_root() -> Path:
    """``$DIFFREP_DATA``, else ``~/.cache/diffrep/data``: where datasets are looked for and unpacked."""
    env = os.environ.get("DIFFREP_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffrep" / "data"


def default_shared_dir() -> Path:
    """``$DIFFREP_SHARED``, else ``../shared`` beside the repository: where source archives are found."""
    env = os.environ.get("DIFFREP_SHARED")
    return Path(env).expanduser() if env else repo_root().parent / "shared"


@dataclass(frozen=True)
class Manifest:
    """A checked manifest: the file it came from and one raw entry per dataset name."""

    path: Path
    datasets: Mapping[str, Mapping[str, Any]]

    @property
    def names(self) -> list[str]:
        """Dataset names, sorted."""
        return sorted(self.datasets)


@dataclass(frozen=True)
class SplitSpec:
    """One split of a dataset, with absolute paths.

    Attributes:
        name: split name (``train``, ``val``, ``test`` ...).
        format: layout of this split (one of :data:`FORMATS`).
        path: the split's folder (class tree for ``folder``/``list``, metadata folder for ``cub``,
            the dataset root for ``torchvision``/``stanford_dogs``).
        list_file: the image list (``list`` format), else None.
        key: format-specific split selector (torchvision ``split=``, CUB's is_training value,
            Stanford Dogs' list name), else None.
    """

    name: str
    format: str
    path: Path
    list_file: Path | None = None
    key: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset resolved for this machine: every path absolute, overrides applied.

    Attributes:
        name: dataset name in the manifest.
        description: one line from the manifest.
        format: the entry's default layout.
        data_root: the data root the relative paths were resolved against.
        root: the dataset's folder.
        splits: split name -> :class:`SplitSpec`.
        classes_file: class-list file restricting the classes, else None.
        source_archive: tarball to unpack into ``data_root`` when ``root`` is missing, else None.
        loader: torchvision dataset class name (``torchvision`` format), else None.
        options: keyword arguments for the loader.
    """

    name: str
    description: str
    format: str
    data_root: Path
    root: Path
    splits: Mapping[str, SplitSpec]
    classes_file: Path | None = None
    source_archive: Path | None = None
    loader: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> SplitSpec:
        """The named split.

        Raises:
            DatasetError: the dataset has no such split.
        """
        if name not in self.splits:
            raise DatasetError(
                f"dataset '{self.name}' has no split '{name}': its splits are {', '.join(self.splits)}"
            )
        return self.splits[name]


def _check_entry(name: str, entry: Any, path: Path) -> None:
    """Raise DatasetError naming the first problem of one manifest entry."""
    where = f"{path}: dataset '{name}'"
    if not isinstance(entry, Mapping):
        raise DatasetError(f"{where} must be a mapping with format, root and splits")
    unknown = sorted(set(entry) - _DATASET_KEYS)
    if unknown:
        raise DatasetError(f"{where} has unknown key(s) {', '.join(unknown)}: allowed are {', '.join(sorted(_DATASET_KEYS))}")
    for key in ("format", "root", "splits"):
        if key not in entry:
            raise DatasetError(f"{where} has no '{key}': add it (see the schema at the top of the manifest)")
    formats = [entry["format"]]
    splits = entry["splits"]
    if not isinstance(splits, Mapping) or not splits:
        raise DatasetError(f"{where}: 'splits' must map split names to paths, e.g. {{train: train, test: test}}")
    for split_name, split in splits.items():
        if isinstance(split, Mapping):
            unknown = sorted(set(split) - _SPLIT_KEYS)
            if unknown:
                raise DatasetError(
                    f"{where} split '{split_name}' has unknown key(s) {', '.join(unknown)}: allowed are {', '.join(sorted(_SPLIT_KEYS))}"
                )
            formats.append(split.get("format", entry["format"]))
            if split.get("format", entry["format"]) == "list" and "list" not in split:
                raise DatasetError(f"{where} split '{split_name}' has format list but no 'list' file: add list: <file>")
        elif not isinstance(split, str):
            raise DatasetError(f"{where} split '{split_name}' must be a path or a mapping {{path, format, list, key}}")
    for fmt in formats:
        if fmt not in FORMATS:
            raise DatasetError(f"{where} has unknown format '{fmt}': use one of {', '.join(FORMATS)}")
    if "torchvision" in formats and not entry.get("loader"):
        raise DatasetError(f"{where} has format torchvision but no 'loader': name a torchvision.datasets class, e.g. FGVCAircraft")
    if "options" in entry and not isinstance(entry["options"], Mapping):
        raise DatasetError(f"{where}: 'options' must be a mapping of loader keyword arguments")
    if "torchvision" in formats and entry["loader"] not in TORCHVISION_LOADERS:
        raise DatasetError(f"{where} has unknown loader {str(entry['loader'])[:60]!r}: use one of "
                           f"{', '.join(TORCHVISION_LOADERS)}, or format folder or list")
    reserved = [key for key in _RESERVED_OPTIONS if key in (entry.get("options") or {})]
    if "download" in reserved:
        raise DatasetError(f"{where} sets options.download: diffrep never downloads at run time; download the data "
                           f"yourself, point the entry's root at it and remove 'download' from its options")
    if reserved:
        raise DatasetError(f"{where} sets options.{reserved[0]}, which diffrep passes itself: remove it "
                           f"(the folder is 'root', the split the split's 'key')")


def _check_names(name: Any, entry: Any, path: Path) -> None:
    """The dataset's name and its split names become cache folders: each must be one safe folder name."""
    check_name(name, f"{path}: dataset")
    if isinstance(entry, Mapping) and isinstance(entry.get("splits"), Mapping):
        for split_name in entry["splits"]:
            check_name(split_name, f"{path}: dataset '{name}' split")


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Read and check a data manifest.

    Args:
        path: YAML file; None reads :func:`default_manifest_path`.

    Returns:
        The checked :class:`Manifest`.

    Raises:
        DatasetError: the file is missing, is not YAML, or an entry breaks the schema (an unknown loader, a
            download option); BadNameError: a dataset or split name that cannot be a folder name.
    """
    path = Path(path).expanduser() if path is not None else default_manifest_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read data manifest {path} ({exc.strerror or exc}): pass an existing file or set DIFFREP_MANIFEST") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise DatasetError(f"data manifest {path} is not valid YAML ({detail}): fix the file") from exc
    if not isinstance(document, Mapping) or not isinstance(document.get("datasets"), Mapping):
        raise DatasetError(f"data manifest {path} has no 'datasets' mapping: start it with 'datasets:' and one entry per dataset")
    datasets = document["datasets"]
    for name, entry in datasets.items():
        _check_names(name, entry, path)
        _check_entry(str(name), entry, path)
    return Manifest(path=path, datasets={str(name): entry for name, entry in datasets.items()})


def _resolve(base: Path, value: str | os.PathLike) -> Path:
    """``value`` expanded, and joined to ``base`` unless absolute."""
    value = Path(value).expanduser()
    return value if value.is_absolute() else base / value


def get_dataset(
    name: str,
    manifest: Manifest | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DatasetSpec:
    """Resolve one manifest entry into absolute paths for this machine.

    Args:
        name: dataset name, e.g. ``cifar10``.
        manifest: a loaded manifest; None loads the default one.
        overrides: paths that win over the manifest (each optional; relative values are taken
            from the current directory):
            ``data_root`` (``--data-root``; default :func:`default_data_root`),
            ``shared_dir`` (default :func:`default_shared_dir`),
            ``root`` (the dataset's own folder),
            ``split_dirs`` (``{split: folder}``, ``--split-dir``),
            ``lists`` (``{split: list file}``),
            ``classes`` (class-list file).

    Returns:
        The :class:`DatasetSpec`.

    Raises:
        BadNameError: a name that cannot be a folder name; DatasetError: unknown dataset or override key.
    """
    check_name(name, "dataset")
    manifest = manifest if manifest is not None else load_manifest()
    if name not in manifest.datasets:
        raise DatasetError(
            f"unknown dataset '{name}': known datasets are {', '.join(manifest.names)}; add an entry to {manifest.path.name}"
        )
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - _OVERRIDE_KEYS)
    if unknown:
        raise DatasetError(f"unknown dataset override(s) {', '.join(unknown)}: allowed are {', '.join(sorted(_OVERRIDE_KEYS))}")
    entry = manifest.datasets[name]
    cwd = Path.cwd()

    data_root = _resolve(cwd, overrides["data_root"]) if overrides.get("data_root") else default_data_root()
    shared_dir = _resolve(cwd, overrides["shared_dir"]) if overrides.get("shared_dir") else default_shared_dir()
    root = _resolve(cwd, overrides["root"]) if overrides.get("root") else _resolve(data_root, str(entry["root"]))

    split_dirs = dict(overrides.get("split_dirs") or {})
    lists = dict(overrides.get("lists") or {})
    splits: dict[str, SplitSpec] = {}
    for split_name, raw in entry["splits"].items():
        raw = {"path": raw} if isinstance(raw, str) else dict(raw)
        fmt = raw.get("format", entry["format"])
        if split_name in split_dirs and split_dirs[split_name]:
            path = _resolve(cwd, split_dirs[split_name])
        else:
            path = _resolve(root, str(raw.get("path", ".")))
        list_file = None
        if split_name in lists and lists[split_name]:
            list_file = _resolve(cwd, lists[split_name])
        elif raw.get("list"):
            list_file = _resolve(root, str(raw["list"]))
        key = raw.get("key")
        splits[str(split_name)] = SplitSpec(
            name=str(split_name), format=fmt, path=path, list_file=list_file,
            key=None if key is None else str(key),
        )

    classes_file = None
    if overrides.get("classes"):
        classes_file = _resolve(cwd, overrides["classes"])
    elif entry.get("classes"):
        classes_file = _resolve(root, str(entry["classes"]))
    source_archive = _resolve(shared_dir, str(entry["source_archive"])) if entry.get("source_archive") else None

    return DatasetSpec(
        name=name,
        description=str(entry.get("description", "")),
        format=str(entry["format"]),
        data_root=data_root,
        root=root,
        splits=splits,
        classes_file=classes_file,
        source_archive=source_archive,
        loader=entry.get("loader"),
        options=dict(entry.get("options") or {}),
    )
