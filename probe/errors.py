"""The probe stage's errors (heads, training, kNN, CKA): one line each, what is wrong and what to do."""

from extract.errors import DiffrepError

__all__ = ["ProbeError"]


class ProbeError(DiffrepError, ValueError):
    """A probe, kNN, CKA or results request that cannot run as asked."""
