"""The results table: one Parquet row per probe, kNN or sweep run, appended under a file lock.

``results/results.parquet`` (or ``$DIFFREP_RESULTS``) holds every run with the columns of
``RESULTS_SCHEMA``; ``append_results`` adds rows atomically (read, concatenate, write to a temporary
file, rename) while holding ``results.parquet.lock``, so concurrent runs never lose a row.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from extract.errors import ProbeError

from .locks import file_lock

__all__ = [
    "RESULTS_SCHEMA", "REQUIRED", "default_results_path", "results_table", "append_result", "append_results", "read_results",
]

RESULTS_SCHEMA = pa.schema([
    ("dataset", pa.string()),
    ("train_size", pa.int64()),
    ("test_size", pa.int64()),
    ("backbone_id", pa.string()),
    ("head", pa.string()),          # linear, mlp, cnn, attention, knn
    ("blocks", pa.string()),        # "24" or "19,24"
    ("timesteps", pa.string()),     # "150" or "90,150"
    ("pool", pa.int64()),           # pooled side the head saw (0: full maps)
    ("k", pa.int64()),              # kNN neighbours (null for trained heads)
    ("parameters", pa.int64()),
    ("epochs", pa.int64()),
    ("lr", pa.float64()),
    ("optimizer", pa.string()),
    ("batch_size", pa.int64()),
    ("seed", pa.int64()),
    ("top1", pa.float64()),         # fractions in [0, 1]
    ("top5", pa.float64()),
    ("train_seconds", pa.float64()),
    ("date", pa.string()),          # ISO 8601, UTC
])
REQUIRED = ("dataset", "backbone_id", "head", "blocks", "timesteps", "top1")


def default_results_path() -> Path:
    """``$DIFFREP_RESULTS`` or ``results/results.parquet`` under the current directory."""
    return Path(os.environ.get("DIFFREP_RESULTS", os.path.join("results", "results.parquet")))


def _normalize(row: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(row) - set(RESULTS_SCHEMA.names))
    if unknown:
        raise ProbeError(f"results rows have no column {', '.join(unknown)}: columns are {', '.join(RESULTS_SCHEMA.names)}")
    missing = [name for name in REQUIRED if row.get(name) is None]
    if missing:
        raise ProbeError(f"a results row needs {', '.join(missing)}: fill them before appending")
    out = {name: row.get(name) for name in RESULTS_SCHEMA.names}
    for name in ("blocks", "timesteps"):
        if not isinstance(out[name], str):
            out[name] = ",".join(str(int(v)) for v in out[name])
    if out["date"] is None:
        out["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return out


def results_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (as for ``append_results``) as a table with ``RESULTS_SCHEMA``, without writing them."""
    return pa.Table.from_pylist([_normalize(row) for row in rows], schema=RESULTS_SCHEMA)


def append_results(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike | None = None) -> Path:
    """Append rows to the results table (created on first use).

    Args:
        rows: dicts keyed by ``RESULTS_SCHEMA`` names; missing optional columns are null, ``date``
            defaults to now, ``blocks``/``timesteps`` may be lists of ints.
        path: the Parquet file (default ``default_results_path()``).

    Returns:
        The path written.

    Raises:
        ProbeError: an unknown column or a missing required one.
    """
    path = Path(path) if path is not None else default_results_path()
    new = results_table(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        table = pa.concat_tables([read_results(path), new]) if path.exists() else new
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return path


def append_result(row: Mapping[str, Any], path: str | os.PathLike | None = None) -> Path:
    """Append one row (see ``append_results``)."""
    return append_results([row], path)


def read_results(path: str | os.PathLike | None = None) -> pa.Table:
    """The results table with ``RESULTS_SCHEMA`` columns (columns added later read as null).

    Raises:
        ProbeError: the file does not exist.
    """
    path = Path(path) if path is not None else default_results_path()
    if not path.exists():
        raise ProbeError(f"no results table at {path}: run diffrep probe, knn or sweep first, or pass --results")
    table = pq.read_table(path)
    columns = [
        table.column(field.name).cast(field.type) if field.name in table.column_names
        else pa.nulls(table.num_rows, field.type)
        for field in RESULTS_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=RESULTS_SCHEMA)
