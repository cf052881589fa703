"""The identity of a backbone's weights, ``<config>-<sha12>``: one string for cache folders and results rows alike.

Every path that records which weights produced a number (the extract job's cache folder, ``probe
--live``, ``diffrep feedback``) names them with :func:`backbone_id`, so rows of the same weights
join whichever path wrote them, and two different checkpoint files never share an id. The file is
hashed once per version (path, size, modification time) in a process.
"""

from __future__ import annotations

import functools
import os

from extract.backbone.checkpoint import file_sha256, require_checkpoint_file

__all__ = ["backbone_id", "checkpoint_sha256"]


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a checkpoint file, computed once per file version.

    Raises:
        CheckpointError: the file does not exist or is not a regular file.
    """
    path = os.path.realpath(os.fspath(path))
    require_checkpoint_file(path)
    stat = os.stat(path)
    return _sha256_of_version(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def backbone_id(config_name: str, checkpoint: str | os.PathLike | None = None, weight_seed: int | None = None,
                *, sha256: str = "") -> str:
    """The id of a backbone's weights: ``<config>-<sha256[:12]>`` for a checkpoint, ``<config>-random<seed>`` otherwise.

    Args:
        config_name: the named configuration, e.g. ``32x32_small``.
        checkpoint: the checkpoint file (hashed once per version), or None for random weights.
        weight_seed: the seed of random weights (None counts as 0, the default seed); ignored with a checkpoint.
        sha256: the checkpoint's digest when the caller already has it (instead of ``checkpoint``).

    Returns:
        e.g. ``32x32_small-1a2b3c4d5e6f`` or ``32x32_small-random0``.

    Raises:
        CheckpointError: ``checkpoint`` does not exist or is not a regular file.
    """
    digest = sha256 or (checkpoint_sha256(checkpoint) if checkpoint else "")
    if digest:
        return f"{config_name}-{digest[:12]}"
    return f"{config_name}-random{int(weight_seed or 0)}"
