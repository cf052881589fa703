"""Evaluation runs on cached features: one probe, kNN, CKA matrices, and (b, t, pool) sweeps.

Each run takes one request object (what the user asked, as ``ExtractionRequest`` does for
extraction), opens the train/test caches written by ``diffrep extract``, checks that they can be
compared (``cache_pair``), calls the probe library, records its rows in the results table
(``pipeline.results.record_rows``) and returns them. Nothing here knows click.

- ``cache_pair``: ``CacheSelection``, ``FitProtocol``, the pair's checks, provenance, label fraction.
- ``probe``: ``ProbeRequest``, ``run_probe`` (any head; the converged and the paper's linear probe).
- ``knn``: ``KnnRequest``, ``run_knn``.  ``cka``: ``CkaRequest``, ``run_cka``.
- ``sweep``: ``SweepRequest``, ``run_sweep`` over every (b, t) and pool.
"""

from pipeline.evaluate.cache_pair import CacheSelection, FitProtocol, fmt_keys
from pipeline.evaluate.cka import CkaRequest, cka_rows, run_cka
from pipeline.evaluate.knn import KnnRequest, run_knn
from pipeline.evaluate.probe import SOLVERS, ProbeRequest, run_probe
from pipeline.evaluate.sweep import SweepRequest, run_sweep

__all__ = [
    "CacheSelection", "FitProtocol", "ProbeRequest", "KnnRequest", "CkaRequest", "SweepRequest",
    "run_probe", "run_knn", "run_cka", "run_sweep", "cka_rows", "fmt_keys", "SOLVERS",
]
