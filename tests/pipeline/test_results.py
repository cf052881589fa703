"""The results table: rows append, columns are typed, bad rows are refused with one line."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ResultsError
from pipeline.results import RESULTS_SCHEMA, append_results, read_results

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
