"""The results table: rows append, columns are typed, bad rows are refused with one line."""

import errno
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ResultsError
from pipeline.results import RESULTS_SCHEMA, append_results, read_results, record_rows

ROW = dict(dataset="cifar10", train_size=500, test_size=200, backbone_id="32x32_small-random0", head="linear",
           blocks=[24], timesteps=[150, 90], pool=2, parameters=1234, epochs=28, lr=0.01, solver="sgd",
           batch_size=256, seed=0, top1=0.41, top5=0.88, train_seconds=1.5)


def test_append_creates_then_appends(tmp_path):
    path = tmp_path / "results" / "results.parquet"
    append_results([ROW], path)
    append_results([dict(ROW, head="knn", k=20, top1=0.3, parameters=0), dict(ROW, seed=1)], path)
    table = read_results(path)
    assert table.schema == RESULTS_SCHEMA and table.num_rows == 3
    assert table.column("head").to_pylist() == ["linear", "knn", "linear"]
    assert table.column("k").to_pylist() == [None, 20, None]
    assert table.column("timesteps").to_pylist()[0] == "150,90"
    assert all(d.endswith("+00:00") for d in table.column("date").to_pylist())
    assert not list(tmp_path.glob("results/.*tmp"))


def test_older_files_without_a_column_read_as_null(tmp_path):
    path = tmp_path / "results.parquet"
    pq.write_table(pa.table({"dataset": ["x"], "head": ["linear"], "top1": [0.5]}), path)
    table = read_results(path)
    assert table.column("k").to_pylist() == [None] and table.column("top1").to_pylist() == [0.5]


def test_bad_rows_and_missing_file(tmp_path):
    with pytest.raises(ResultsError, match="no column accuracy"):
        append_results([dict(ROW, accuracy=1)], tmp_path / "r.parquet")
    with pytest.raises(ResultsError, match="needs top1"):
        append_results([dict(ROW, top1=None)], tmp_path / "r.parquet")
    with pytest.raises(ResultsError, match="no results table"):
        read_results(tmp_path / "none.parquet")


def test_rows_the_table_refuses_are_kept_beside_it(tmp_path):
    path = tmp_path / "results.parquet"
    record_rows([ROW], path)
    rows = [dict(ROW, seed=1), dict(ROW, seed=2, accuracy=1)]  # the second has a column the table does not
    with pytest.raises(ResultsError) as info:
        record_rows(rows, path)
    kept = list(tmp_path.glob("results.parquet.unsaved-*.json"))
    assert len(kept) == 1 and f"the rows are in {kept[0]}" in str(info.value)
    assert json.loads(kept[0].read_text()) == json.loads(json.dumps(rows))
    assert read_results(path).column("seed").to_pylist() == [0], "nothing of a refused batch is appended"


def _fail_writes_under(monkeypatch, folders, error):
    """Every fsync of a file under one of ``folders`` fails with ``error`` (a full disk shows there, after the
    bytes were accepted): the file was opened and partly written, as on a real full disk."""
    real = os.fsync

    def fsync(fd):
        if any(os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)) for folder in folders):
            raise OSError(error, os.strerror(error))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _full_table(monkeypatch, error):
    def write_table(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1")  # the disk takes a few bytes, then refuses
        raise OSError(error, os.strerror(error), str(where))

    monkeypatch.setattr(pq, "write_table", write_table)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_a_table_that_cannot_be_written_keeps_the_row_whole_in_the_first_folder_that_takes_it(tmp_path, monkeypatch, error):
    table_dir, spare = tmp_path / "results", tmp_path / "tmp"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(spare))
    _full_table(monkeypatch, error)
    _fail_writes_under(monkeypatch, [table_dir], error)  # the table's folder takes no JSON either
    shown = []
    with pytest.raises(ResultsError) as info:
        record_rows([ROW], table_dir / "results.parquet", announce=shown.append)
    assert shown == [ROW], "the result is shown before anything is written"
    assert sorted(p.name for p in table_dir.iterdir()) == ["results.parquet.lock"], "nothing empty or cut short is left"
    kept = list(spare.iterdir())
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == json.loads(json.dumps([ROW]))
    message = str(info.value)
    assert "\n" not in message and f"the rows are in {kept[0]}" in message and os.strerror(error) in message


def test_rows_no_folder_can_keep_are_carried_in_the_error_itself(tmp_path, monkeypatch):
    table_dir, spare = tmp_path / "results", tmp_path / "tmp"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(spare))
    _full_table(monkeypatch, errno.ENOSPC)
    _fail_writes_under(monkeypatch, [table_dir, spare], errno.ENOSPC)
    with pytest.raises(ResultsError) as info:
        record_rows([ROW], table_dir / "results.parquet")
    message = str(info.value)
    assert "could not keep the rows anywhere" in message and str(spare) in message and "\n" not in message
    assert json.loads(message.split("the rows are ", 1)[1]) == json.loads(json.dumps([ROW]))
    assert list(spare.iterdir()) == [] and [p.name for p in table_dir.iterdir()] == ["results.parquet.lock"]


def test_a_table_below_a_file_keeps_the_rows_in_the_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(ResultsError, match="a-file"):
        record_rows([ROW], blocked / "results.parquet")
    kept = list(tmp_path.glob("results.parquet.unsaved-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())[0]["top1"] == 0.41
