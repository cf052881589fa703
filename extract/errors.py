"""The exceptions diffrep raises: one line each, saying what is wrong and what to do."""

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
    """A cache array some of whose shards are not written yet."""


class CacheDamagedError(CacheIncompleteError):
    """Cache objects that changed after they were written (missing, short, undecodable, failing their checksum,
    non-finite): ``diffrep verify --repair`` and ``diffrep extract`` redo them."""


class DiskSpaceError(DiffrepError, OSError):
    """Not enough free disk for what was asked."""
