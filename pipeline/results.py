"""The results table: one Parquet row per probe, kNN or sweep run, appended under a file lock.

``results/results.parquet`` (or ``$DIFFREP_RESULTS``) holds every run with the columns of
``RESULTS_SCHEMA``; ``append_results`` adds rows atomically (read, concatenate, write to a temporary
file, rename) while holding ``results.parquet.lock``, so concurrent runs never lose a row. A table
that cannot be read is never the end of a finished run: it is moved aside (renamed, with a
warning) and a new table is started with the row. ``record_rows`` is what a finished run calls, after
showing its result: rows the table refuses are kept whole in a JSON file beside it (else in the temporary
folder), or, when nothing can be written, carried in the error itself: never lost.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from extract import distributed
from pipeline.errors import ResultsError
from pipeline.locks import file_lock

__all__ = [
    "RESULTS_SCHEMA", "REQUIRED", "default_results_path", "results_table", "append_results", "record_rows", "read_results",
]

RESULTS_SCHEMA = pa.schema([
    ("dataset", pa.string()),
    ("train_size", pa.int64()),
    ("test_size", pa.int64()),
    ("backbone_id", pa.string()),
    ("head", pa.string()),          # linear, mlp, cnn, attention, difformer, diffeed, knn
    ("strategy", pa.string()),      # DifFeed feedback strategy
    ("protocol", pa.string()),      # converged (standardised L-BFGS), paper (28 epochs StepLR), live, knn
    ("solver", pa.string()),        # lbfgs, sgd, adam (null for knn)
    ("l2", pa.float64()),           # L2 weight chosen (converged probe)
    ("heldout_size", pa.int64()),   # train rows held out to choose l2 / lr (0: none)
    ("label_fraction", pa.float64()),  # share of every class's training labels used (null: all)
    ("standardize", pa.bool_()),    # features standardised with training statistics
    ("fresh_noise", pa.bool_()),    # live backbone: new noise every step (null: cached features)
    ("augment", pa.bool_()),        # live backbone: random resized crop + flip every step
    ("finetune", pa.bool_()),       # the backbone trained too (live backbone only)
    ("train_views", pa.int64()),    # cached views trained on, one per image per epoch (noise draws x flips)
    ("train_split", pa.string()),
    ("test_split", pa.string()),
    ("noise_seed", pa.int64()),     # of the cache
    ("cache_pool", pa.int64()),     # stored pool of the cache (0: full maps)
    ("blocks", pa.string()),        # "24" or "19,24"
    ("timesteps", pa.string()),     # "150" or "90,150"
    ("pool", pa.int64()),           # pooled side the head saw (0: full maps)
    ("k", pa.int64()),              # kNN neighbours (null for trained heads)
    ("parameters", pa.int64()),
    ("epochs", pa.int64()),
    ("lr", pa.float64()),           # lr chosen (paper protocol)
    ("batch_size", pa.int64()),
    ("seed", pa.int64()),
    ("top1", pa.float64()),         # fractions in [0, 1]
    ("top5", pa.float64()),
    ("train_seconds", pa.float64()),
    ("date", pa.string()),          # ISO 8601, UTC
    ("task", pa.string()),          # detect or segmentation (null: image classification)
    ("metric", pa.string()),        # what top1 holds when it is not top-1: miou (mean IoU over classes present)
    ("image_size", pa.int64()),     # model input side in pixels (null: the configuration's)
    ("pixel_accuracy", pa.float64()),
    ("class_iou", pa.string()),     # JSON {class: IoU} over the classes present in the test split
    ("pixels_per_second", pa.float64()),  # labelled pixels trained on per second (dense heads)
    ("box_ap", pa.float64()),       # COCO AP over IoU 0.50:0.95, AP50, AP75 (fractions; detect)
    ("box_ap50", pa.float64()),
    ("box_ap75", pa.float64()),
    ("mask_ap", pa.float64()),      # the same for masks (Mask R-CNN)
    ("mask_ap50", pa.float64()),
    ("mask_ap75", pa.float64()),
])
REQUIRED = ("dataset", "backbone_id", "head", "blocks", "timesteps")
#: A row needs one of these scores (top1: classification, box_ap: detection).
SCORES = ("top1", "box_ap")

log = logging.getLogger(__name__)


def default_results_path() -> Path:
    """``$DIFFREP_RESULTS`` or ``results/results.parquet`` under the current directory."""
    return Path(os.environ.get("DIFFREP_RESULTS", os.path.join("results", "results.parquet")))


def _normalize(row: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(row) - set(RESULTS_SCHEMA.names))
    if unknown:
        raise ResultsError(f"results rows have no column {', '.join(unknown)}: columns are {', '.join(RESULTS_SCHEMA.names)}")
    missing = [name for name in REQUIRED if row.get(name) is None]
    if missing:
        raise ResultsError(f"a results row needs {', '.join(missing)}: fill them before appending")
    if all(row.get(name) is None for name in SCORES):
        raise ResultsError(f"a results row needs {' or '.join(SCORES)} (a score): fill it before appending")
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

    An existing table that cannot be read (truncated, not Parquet) is renamed to
    ``<name>.unreadable-<time>`` with a one-line warning and a new table starts with these rows:
    a finished run never loses its row to a damaged table.

    Args:
        rows: dicts keyed by ``RESULTS_SCHEMA`` names; missing optional columns are null, ``date``
            defaults to now, ``blocks``/``timesteps`` may be lists of ints.
        path: the Parquet file (default ``default_results_path()``).

    Returns:
        The path written.

    Raises:
        ResultsError: an unknown column or a missing required one.
    """
    path = Path(path) if path is not None else default_results_path()
    new = results_table(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        table = new
        if path.exists():
            try:
                table = pa.concat_tables([read_results(path), new])
            except ResultsError as exc:
                stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
                aside = path.with_name(f"{path.name}.unreadable-{stamp}")
                os.replace(path, aside)
                log.warning("%s; moved it to %s and started a new table", exc, aside)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk or a Ctrl-C leaves no half-written table behind
                tmp.unlink()
            raise
    return path


def record_rows(rows: list[dict], path: str | os.PathLike | None = None,
                announce: Callable[[dict], None] | None = None) -> None:
    """Show a finished run's rows, then append them; if the table cannot take them, keep them in a JSON file.

    In a distributed run only rank 0 records (the others return at once). ``announce`` (the CLI's summary
    line) is called with every row before anything is written, so a
    table that cannot be written never takes the result with it. The JSON goes beside the table, else
    to the temporary folder; it is written whole or not at all (never left empty or cut short).

    Raises:
        ResultsError: the rows were not appended; the message names the JSON file that holds them, or,
            when no folder could keep them, says so and carries the rows themselves.
    """
    if not distributed.is_main():  # a distributed run records once, on rank 0
        return
    for row in rows if announce is not None else ():
        announce(row)
    try:
        append_results(rows, path)
    except (OSError, ResultsError) as exc:
        path = Path(path) if path is not None else default_results_path()
        reason = _reason(exc)
        text = json.dumps(rows, default=str)
        kept, failures = None, []
        for folder in dict.fromkeys([path.parent, Path(tempfile.gettempdir())]):
            try:
                kept = _write_whole(folder / f"{path.name}.unsaved-{int(time.time())}-{os.getpid()}.json", text)
                break
            except OSError as failed:
                failures.append(f"{folder}: {_reason(failed)}")
        if kept is None:
            raise ResultsError(f"could not write the results table {path} ({reason}) and could not keep the rows "
                               f"anywhere ({'; '.join(failures)}): the rows are {text}") from None
        fix = "; free space or fix the folder's permissions, then append them" if isinstance(exc, OSError) else ""
        raise ResultsError(f"could not write the results table {path} ({reason}): the rows are in {kept}{fix}") from None


def _reason(exc: BaseException) -> str:
    """An error as a few words: the OS's reason and the file it concerns, or the message on one line."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return " ".join(str(exc).split())[:200]


def _write_whole(target: Path, text: str) -> Path:
    """Write ``text`` to ``target`` through a temporary file renamed into place; nothing is left if it fails."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return target


def read_results(path: str | os.PathLike | None = None) -> pa.Table:
    """The results table with ``RESULTS_SCHEMA`` columns (columns added later read as null).

    Raises:
        ResultsError: the file does not exist or is not a readable Parquet table.
    """
    path = Path(path) if path is not None else default_results_path()
    if not path.exists():
        raise ResultsError(f"no results table at {path}: run diffrep probe, knn or sweep first, or pass --results")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise ResultsError(f"results table {path} is not readable Parquet ({reason}): move it away, or pass "
                           f"--results to use another table") from None
    if "optimizer" in table.column_names and "solver" not in table.column_names:  # tables before the solver column
        table = table.append_column("solver", table.column("optimizer"))
    columns = [
        table.column(field.name).cast(field.type) if field.name in table.column_names
        else pa.nulls(table.num_rows, field.type)
        for field in RESULTS_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=RESULTS_SCHEMA)
