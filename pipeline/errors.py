"""The pipeline's errors (datasets and manifest, results table, runs): one line each, what is wrong and what to do."""

from extract.errors import DiffrepError

__all__ = ["DatasetError", "ResultsError", "BadNameError", "SearchError", "DistributedRunFailed"]


class DatasetError(DiffrepError, FileNotFoundError):
    """An unknown dataset, a missing folder or an empty class."""


class ResultsError(DiffrepError, ValueError):
    """A results table that cannot be read or written as asked."""


class BadNameError(DiffrepError, ValueError):
    """A dataset, split or backbone name that cannot be one folder name (a path, ``..``, control characters)."""


class SearchError(DiffrepError, ValueError):
    """Search settings that leave nothing to search (stage sizes, keep share, growth)."""


class DistributedRunFailed(DiffrepError, RuntimeError):
    """A rank of a distributed run (``--nproc``, torchrun) stopped the job."""
