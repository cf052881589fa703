"""The exceptions diffrep raises: one line each, saying what is wrong and what to do."""

import contextlib

__all__ = [
    "DiffrepError",
    "ConfigError",
    "CheckpointError",
    "BlockRangeError",
    "TimestepRangeError",
    "CacheError",
    "CacheMismatchError",
    "CacheIncompleteError",
    "CacheDamagedError",
    "DiskSpaceError",
    "RunInterrupted",
    "interrupted_saying",
]


class DiffrepError(Exception):
    """Base of every error diffrep reports to a user as one line (the CLI prints it, exit 1)."""


class ConfigError(DiffrepError, ValueError):
    """An unknown named configuration or an invalid model flag."""


class CheckpointError(DiffrepError, ValueError):
    """A checkpoint file that is missing, unreadable, or does not fit the configuration."""


class BlockRangeError(DiffrepError, ValueError):
    """A block number outside 1..num_blocks of the backbone."""


class TimestepRangeError(DiffrepError, ValueError):
    """A diffusion timestep outside 0..T-1 of the schedule."""


class CacheError(DiffrepError, ValueError):
    """A feature cache that cannot be used as asked."""


class CacheMismatchError(CacheError):
    """A cache written with other settings than the ones asked for."""


class CacheIncompleteError(CacheError):
    """A cache array some of whose shards are not written yet (or lost), or that is not there at all.

    Attributes (optional; the command line builds the exact ``diffrep extract`` command from them,
    ``pipeline.advice.advised``):
        problem: what is missing, without the remedy. spec: the cache's ``CacheSpec``. path: its folder.
        arrays: the (b, t) arrays that command must write. runs: the cache's run records.
    """

    def __init__(self, message: str, *, problem: str | None = None, spec=None, path: str | None = None,
                 arrays=(), runs=()):
        super().__init__(message)
        self.problem, self.spec, self.path = problem or message, spec, path
        self.arrays, self.runs = tuple(arrays), tuple(runs)


class CacheDamagedError(CacheIncompleteError):
    """Cache objects that changed after they were written (missing, short, undecodable, failing their checksum,
    non-finite): ``diffrep verify --repair`` and ``diffrep extract`` redo them."""


class DiskSpaceError(DiffrepError, OSError):
    """Not enough free disk for what was asked."""


class RunInterrupted(KeyboardInterrupt):
    """A Ctrl-C that says what was kept and how to go on: the CLI prints it as one line and exits with status 130."""


@contextlib.contextmanager
def interrupted_saying(message: str):
    """Inside, a bare Ctrl-C becomes ``RunInterrupted(message)``; one that already says what was kept passes as it is."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if str(exc):
            raise
        raise RunInterrupted(message) from None
