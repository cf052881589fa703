"""A dataset's source archive: unpacked into the data root once per machine, or listed without unpacking.

:func:`ensure_unpacked` unpacks a tarball safely when several processes ask at the same time;
:func:`list_archive` and :func:`listed_archive` read what unpacking would give (a dry run writes
nothing). An index reads a folder dataset through a tree: :class:`DiskTree` (the folders on disk)
or :class:`ArchiveTree` (the archive's listing), which list the same files in the same order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

from extract.inputs.images import IMAGE_EXTENSIONS

from pipeline.errors import DatasetError
from pipeline.locks import file_lock
from pipeline.manifest import DatasetSpec, SplitSpec, repo_root

__all__ = ["ensure_unpacked", "list_archive", "listed_archive", "ArchiveTree", "DiskTree", "WHERE_HINT"]

logger = logging.getLogger(__name__)

#: The end of every "images not found" error: where diffrep looks for datasets.
WHERE_HINT = "set DIFFREP_DATA or pass --data-root/--split-dir"


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_checksum(archive: Path, checksums: Path) -> None:
    """Compare the archive with its line in a ``sha256sum``-style file, when it has one."""
    expected = None
    for line in checksums.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-1].lstrip("*") == archive.name:
            expected = parts[0].lower()
    if expected is None:
        logger.debug("%s has no line for %s: not verified", checksums, archive.name)
        return
    actual = _sha256(archive)
    if actual != expected:
        raise DatasetError(
            f"{archive} has sha256 {actual}, but {checksums} says {expected}: the archive is damaged, restore it"
        )


def ensure_unpacked(
    archive: str | os.PathLike,
    data_root: str | os.PathLike,
    folder: str,
    *,
    checksums: str | os.PathLike | None = None,
) -> Path:
    """Unpack a tarball into the data root unless its folder is already there; return that folder.

    The archive is extracted into a temporary folder inside ``data_root`` and its top-level
    folder renamed into place, so ``data_root/folder`` either does not exist or is complete.
    Processes that race wait on a lock file and then find the folder; where locks do not work,
    the loser of the rename discards its copy.

    Args:
        archive: ``.tar``, ``.tar.gz`` ... whose top-level folder is ``folder``.
        data_root: where the folder goes; created if missing; must be outside the repository.
        folder: the archive's top-level folder name (e.g. ``cifar10-jpg``).
        checksums: ``sha256sum``-style file to verify the archive against before unpacking;
            None uses ``SHA256SUMS`` beside the archive when it exists.

    Returns:
        ``data_root / folder``.

    Raises:
        DatasetError: the archive is missing, damaged, fails its checksum, lacks ``folder``, has a member
            that would land outside the data root (absolute path, ``..``, a link escaping it) or is a
            device file (nothing is unpacked), or the data root is inside the repository.
    """
    archive = Path(archive).expanduser()
    data_root = Path(data_root).expanduser()
    target = data_root / folder
    if target.is_dir():
        return target
    if not archive.is_file():
        raise DatasetError(f"{target} does not exist and its source archive {archive} is missing: {WHERE_HINT} or set DIFFREP_SHARED")
    resolved_root = data_root.resolve()
    repo = repo_root()
    if resolved_root == repo or repo in resolved_root.parents:
        raise DatasetError(f"refusing to unpack {archive.name} into the repository ({data_root}): set DIFFREP_DATA or --data-root to a folder outside it")
    if checksums is None and (archive.parent / "SHA256SUMS").is_file():
        checksums = archive.parent / "SHA256SUMS"
    try:
        data_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create data root {data_root} ({exc.strerror or exc}): {WHERE_HINT}") from exc

    with file_lock(data_root / f".{folder}.lock"):
        if target.is_dir():
            return target
        if checksums is not None:
            _verify_checksum(archive, Path(checksums))
        logger.info("unpacking %s into %s (once per machine)", archive, data_root)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder}.unpacking-", dir=data_root))
        try:
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(scratch, filter=_safe_member)
            except tarfile.FilterError as exc:
                raise _unsafe(archive, exc) from None
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DatasetError(f"cannot unpack {archive} ({' '.join(str(exc).split())}): the archive is damaged, restore it") from exc
            unpacked = scratch / folder
            if not unpacked.is_dir():
                raise DatasetError(f"{archive} has no top-level folder '{folder}': fix the manifest's root or the archive")
            try:
                os.rename(unpacked, target)
            except OSError:
                if not target.is_dir():
                    raise
                logger.info("another process unpacked %s first; keeping its copy", target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


_UNSAFE_WHY = (
    (tarfile.AbsolutePathError, "has an absolute path"),
    (tarfile.OutsideDestinationError, "would be written outside the data root (a '..' in its path)"),
    (tarfile.AbsoluteLinkError, "is a link to an absolute path"),
    (tarfile.LinkOutsideDestinationError, "is a link that points outside the data root"),
    (tarfile.SpecialFileError, "is a device or pipe, not a file"),
)


def _safe_member(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo:
    """tarfile's ``data`` filter, which also refuses absolute names (it would only strip their leading ``/``)."""
    if member.name.startswith(("/", os.sep)) or os.path.isabs(member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, destination)


def _unsafe(archive: Path | str, exc: tarfile.FilterError) -> DatasetError:
    """One line naming the member unpacking refuses and why: the archive is not unpacked at all."""
    why = next((text for kind, text in _UNSAFE_WHY if isinstance(exc, kind)), " ".join(str(exc).split()))
    return DatasetError(f"refusing to unpack {archive}: member {exc.tarinfo.name!r} {why}, so nothing is unpacked; "
                        f"get the archive from a source you trust, or unpack it yourself and pass --data-root")


def list_archive(archive: str | os.PathLike, folder: str) -> tuple[list[str], int]:
    """The files an archive would unpack under its top-level ``folder``, without unpacking anything.

    Args:
        archive: ``.tar``, ``.tar.gz`` ...; folder: its top-level folder name.

    Returns:
        (member paths relative to the data root, e.g. ``cifar10-jpg/test/cat/0001.jpg``; their total bytes).

    Raises:
        DatasetError: the archive is missing or damaged, or a member is unsafe (as ``ensure_unpacked`` refuses it).
    """
    names, size = [], 0
    destination = os.path.realpath(tempfile.gettempdir())  # any folder: the filter checks paths, writes nothing
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                _safe_member(member, destination)  # a dry run refuses what unpacking would refuse
                if member.isfile() and member.name.split("/", 1)[0] == folder:
                    names.append(member.name)
                    size += member.size
    except tarfile.FilterError as exc:
        raise _unsafe(archive, exc) from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {archive} ({' '.join(str(exc).split())}): the archive is damaged, restore it") from exc
    return names, size


class ArchiveTree:
    """A folder tree known from an archive's listing: what the folder reader sees, before unpacking."""

    def __init__(self, root: Path, names: Sequence[str]):
        self.files = sorted(str(root / name) for name in names)

    def below(self, folder: Path) -> list[str]:
        """Every listed file below ``folder``, at any depth."""
        prefix = str(folder) + os.sep
        return [path for path in self.files if path.startswith(prefix)]

    def subfolders(self, folder: Path) -> list[str]:
        """Visible sub-folder names of ``folder``, sorted (as ``DiskTree.subfolders``)."""
        relative = [path[len(str(folder)) + 1:] for path in self.below(folder)]
        return sorted({rel.split(os.sep, 1)[0] for rel in relative if os.sep in rel and not rel.startswith(".")})

    def images_under(self, folder: Path) -> list[str]:
        """Image files below ``folder`` outside hidden folders, sorted by relative path (as ``DiskTree.images_under``)."""
        found = [path for path in self.below(folder) if _is_image(os.path.basename(path))
                 and not any(part.startswith(".") for part in Path(path).relative_to(folder).parts)]
        return sorted(found, key=lambda path: Path(os.path.relpath(path, folder)).as_posix())


class DiskTree:
    """The folder tree on disk (the usual case)."""

    @staticmethod
    def subfolders(folder: Path) -> list[str]:
        """Visible sub-folder names of ``folder``, sorted."""
        return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))

    @staticmethod
    def images_under(folder: Path) -> list[str]:
        """Image files below ``folder`` outside hidden folders, sorted by relative path."""
        return _images_under(folder)


def _is_image(name: str) -> bool:
    """A visible file whose name ends in one of IMAGE_EXTENSIONS."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[str]:
    """Image files below ``folder`` (recursively), sorted by their path relative to it."""
    found = []
    for current, dirnames, filenames in os.walk(folder):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        found.extend(os.path.join(current, name) for name in filenames if _is_image(name))
    return sorted(found, key=lambda path: Path(os.path.relpath(path, folder)).as_posix())


def listed_archive(dataset_name: str, spec: DatasetSpec, split: SplitSpec) -> tuple[tuple[str, str, int], ArchiveTree]:
    """What unpacking would give, read from the archive's listing: ((archive, destination, bytes), tree)."""
    archive = Path(spec.source_archive).expanduser()
    if not archive.is_file():
        raise DatasetError(f"{spec.root} does not exist and its source archive {archive} is missing: {WHERE_HINT} or set DIFFREP_SHARED")
    if split.format != "folder":
        raise DatasetError(
            f"dataset '{dataset_name}' is still packed in {archive} and a dry run cannot list a '{split.format}' "
            f"dataset from its archive: run once without --dry-run to unpack it into {spec.data_root}"
        )
    names, size = list_archive(archive, spec.root.name)
    tree = ArchiveTree(Path(spec.data_root).expanduser(), names)
    if not tree.below(split.path):
        raise DatasetError(f"dataset '{dataset_name}' split '{split.name}': {archive} has no folder {split.path.relative_to(spec.data_root)}; {WHERE_HINT}")
    return (str(archive), str(spec.root), size), tree
