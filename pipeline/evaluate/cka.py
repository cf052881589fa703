"""CKA matrices of cached features: block x block at one t and timestep x timestep at one b, ``diffrep cka``.

The matrices go to a Parquet table and heatmaps under ``out_dir``. Rows are all the split's, or
``limit`` rows spread over the classes; minibatch CKA over a whole split too large for RAM is
streamed as training streams it (shards in a seeded order, windows shuffled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from extract.cache import FeatureCache
from extract.precision import resolve_device
from probe.cka import cka_matrix
from probe.errors import ProbeError
from probe.features import StreamedFeatures, choose_read_pool, load_at_pools, open_split, resolve_backbone_id
from probe.subsets import balanced_rows

from pipeline.evaluate.cache_pair import CacheSelection, Key, require_in_ram
from pipeline.report import plot_cka_heatmap

__all__ = ["CkaRequest", "run_cka", "cka_rows"]


@dataclass(frozen=True)
class CkaRequest:
    """Block x block CKA at t=at_t and timestep x timestep CKA at b=at_b, on one split.

    ``limit`` rows are spread evenly over the classes (seeded); minibatches are a seeded random
    draw across the split; the products run on ``device`` (auto: cuda when available) in float32.
    """

    dataset: str
    cache_dir: str
    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]
    config_name: str = "256x256_uncond"
    backbone_id: str | None = None
    split: str = "test"
    at_t: int | None = None
    at_b: int | None = None
    pool: int | None = None
    estimator: str = "minibatch"
    batch_size: int = 256
    limit: int | None = None
    seed: int = 0
    out_dir: str = "results/cka"
    ram_cap_gb: float | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        """The names become the cache's and the outputs' file names; the cap a number of bytes."""
        CacheSelection(dataset=self.dataset, cache_dir=self.cache_dir, backbone_id=self.backbone_id,
                       train_split=self.split, test_split=self.split, allow_same_split=True, ram_cap_gb=self.ram_cap_gb)


def cka_rows(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray | None:
    """Rows a CKA run reads: all (None), or ``limit`` rows spread evenly over the classes, seeded, sorted.

    Dataset indexes are sorted by class, so the first N rows would cover only the first classes.
    """
    if not limit or limit >= len(labels):
        return None
    return balanced_rows(labels, limit, seed)


def run_cka(request: CkaRequest) -> list[Path]:
    """Block x block CKA at t=at_t and timestep x timestep CKA at b=at_b; returns the Parquet and PNG paths written."""
    backbone_id = resolve_backbone_id(request.cache_dir, request.dataset, request.split, request.config_name,
                                      request.backbone_id)
    cache = open_split(request.cache_dir, request.dataset, request.split, backbone_id,
                       int(request.ram_cap_gb * 2**30) if request.ram_cap_gb else None)
    at_t = request.at_t if request.at_t is not None else request.timesteps[0]
    at_b = request.at_b if request.at_b is not None else request.blocks[0]
    panels = []
    if len(request.blocks) > 1:
        panels.append(("blocks", f"t{at_t}", [(b, at_t) for b in request.blocks], [f"b{b}" for b in request.blocks]))
    if len(request.timesteps) > 1:
        panels.append(("timesteps", f"b{at_b}", [(at_b, t) for t in request.timesteps],
                       [f"t{t}" for t in request.timesteps]))
    if not panels:
        raise ProbeError("CKA needs at least two blocks or two timesteps: pass e.g. --blocks 19,24,30 --timesteps 150")
    keys = sorted({key for _, _, ks, _ in panels for key in ks})
    read_pool = {key: choose_read_pool(cache, key, request.pool) for key in keys}
    valid = np.asarray(cache.valid, dtype=bool)
    rows = cka_rows(np.asarray(cache.labels)[valid], request.limit, request.seed)
    device = resolve_device(request.device)
    if request.estimator == "linear" or len(set(read_pool.values())) > 1 or rows is not None:
        require_in_ram(cache, keys, read_pool, request.split,
                       "; or stream it: --estimator minibatch with one --pool and no --limit")
        loaded = load_at_pools(cache, keys, read_pool)
        index = torch.from_numpy(rows) if rows is not None else None
        arrays = [loaded.features[key] if index is None else loaded.features[key][index] for key in keys]
        # float16 as loaded; minibatches are a seeded random partition (cka_matrix), never one class each
        matrix = cka_matrix(arrays, estimator=request.estimator, batch_size=request.batch_size, seed=request.seed,
                            device=device)
    else:
        matrix = _streamed_minibatch_cka(cache, keys, next(iter(read_pool.values())), request, device)
    return _write_cka(matrix, keys, panels, request, backbone_id)


def _streamed_minibatch_cka(cache: FeatureCache, keys: list[Key], pool: int | None, request: CkaRequest,
                            device: torch.device) -> np.ndarray:
    """Minibatch CKA over the whole split, streamed as training streams it: shards in a seeded order, windows shuffled."""
    stream = StreamedFeatures(cache, keys, pool)
    batches = ([features[key] for key in keys] for features, _ in stream.batches(request.batch_size, seed=request.seed))
    return cka_matrix(batches=batches, estimator="minibatch", device=device)


def _write_cka(matrix: np.ndarray, keys: list[Key], panels: list, request: CkaRequest, backbone_id: str) -> list[Path]:
    """One heatmap per panel and one Parquet table of every panel's entries under ``request.out_dir``."""
    out_dir = Path(request.out_dir)
    written, records = [], []
    for kind, fixed, panel_keys, labels in panels:
        index = [keys.index(key) for key in panel_keys]
        sub = matrix[np.ix_(index, index)]
        for i, (bi, ti) in enumerate(panel_keys):
            for j, (bj, tj) in enumerate(panel_keys):
                records.append(dict(dataset=request.dataset, split=request.split, backbone_id=backbone_id, kind=kind,
                                    fixed=fixed, b_row=bi, t_row=ti, b_col=bj, t_col=tj, pool=int(request.pool or 0),
                                    estimator=request.estimator, cka=float(sub[i, j])))
        stem = f"cka_{request.dataset}_{request.split}_{backbone_id}_{kind}_{fixed}"
        written.append(plot_cka_heatmap(sub, labels, out_dir / f"{stem}.png",
                                        title=f"CKA over {kind} at {fixed} ({request.dataset} {request.split})"))
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / f"cka_{request.dataset}_{request.split}_{backbone_id}.parquet"
    pq.write_table(pa.Table.from_pylist(records), table_path)
    return [table_path, *written]
