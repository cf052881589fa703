"""Nothing silent on the cache side: real small caches tampered with on disk, then read, extracted and verified.

Every case asserts the exit code, the one-line message (cause and fix), and that nothing finished
was lost: a repaired cache is compared file by file with one that was never touched.
"""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from extract.cache import open_cache
from extract.errors import CacheError, CacheIncompleteError
from pipeline.cli.main import main

BACKBONE = "32x32_small-random0"
PER_CLASS = 4  # 40 images per split, 4 shards of 10
COMMON = ["--dataset", "cifar10", "--config", "32x32_small", "--timesteps", "90", "--blocks", "4,10", "--pool", "4",
          "--shard-size", "10", "--batch-size", "10", "--threads", "1", "--no-progress"]
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, cifar10_root):
    """The first 4 images of every class of both splits."""
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "test"):
        for class_dir in sorted((Path(cifar10_root) / split).iterdir()):
            target = root / "cifar10-jpg" / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:PER_CLASS]:
                shutil.copyfile(image, target / image.name)
    return root


def _extract(data_root, cache_dir, *extra, env=None):
    args = ["extract", *COMMON, "--data-root", str(data_root), "--cache-dir", str(cache_dir), *extra]
    return CliRunner().invoke(main, args, env=env)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """Both splits extracted in-process, never touched afterwards."""
    cache_dir = tmp_path_factory.mktemp("reference")
    result = _extract(data_root, cache_dir, "--synchronous")
    assert result.exit_code == 0, result.output
    return cache_dir


@pytest.fixture(scope="module")
def chunked(data_root, tmp_path_factory):
    """The same with index chunks of two shards (ImageNet's hold 1,024): a lost index chunk covers several shards."""
    import extract.cache.spec

    cache_dir = tmp_path_factory.mktemp("chunked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract.cache.spec, "INDEX_CHUNK_ROWS", 20)
        result = _extract(data_root, cache_dir, "--synchronous")
    assert result.exit_code == 0, result.output
    return cache_dir


def _copy(reference, tmp_path):
    target = tmp_path / "cache"
    shutil.copytree(reference, target)
    return target, target / "cifar10" / "test" / BACKBONE


def _files(cache_dir):
    """{relative path: bytes} of every object of every cache, the attributes (run history) excepted."""
    out = {}
    for path in sorted(Path(cache_dir).rglob("*")):
        if path.is_file() and not (path.name == "zarr.json" and path.parent.name == BACKBONE) and path.suffix != ".lock":
            out[str(path.relative_to(cache_dir))] = path.read_bytes()
    return out


def _stamps(group):
    return {str(p.relative_to(group)): p.stat().st_mtime_ns for p in Path(group).rglob("*") if p.is_file()}


def _one_error_line(result):
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.output
    return lines[-1][len("Error: "):]


TAMPERS = {
    "shard deleted": ("b10/t90/c/2/0/0/0", "delete"),
    "shard emptied": ("b10/t90/c/2/0/0/0", "empty"),
    "last shard cut in half": ("b10/t90/c/3/0/0/0", "half"),
    "labels deleted": ("index/label/c", "delete"),
    "validity chunk deleted": ("index/valid/c/1", "delete"),
}


def _tamper(group, relative, how):
    target = group / relative
    if how == "delete":
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    else:
        with open(target, "r+b") as handle:
            handle.truncate(0 if how == "empty" else target.stat().st_size // 2)


@pytest.mark.parametrize("case", list(TAMPERS))
def test_lost_objects_are_refused_by_readers_and_redone_by_extract(chunked, data_root, tmp_path, case):
    reference = chunked
    cache_dir, group = _copy(reference, tmp_path)
    before = _stamps(group)
    _tamper(group, *TAMPERS[case])
    cache = open_cache(cache_dir, "cifar10", "test", BACKBONE)
    if case.startswith("labels"):
        with pytest.raises(CacheError, match=r"^index/label of cache .* has damaged chunks 0, 1 \(missing\): "
                                             r"run the same diffrep extract command again: it rewrites them$"):
            cache.labels
    elif case.startswith("validity"):
        with pytest.raises(CacheError, match=r"^index/valid of cache .* has damaged chunks 1 \(missing\)"):
            cache.valid
    else:
        shard = 3 if "last" in case else 2
        with pytest.raises(CacheIncompleteError, match=rf"^array b10/t90 of .* has 1 damaged shard\(s\) {shard} "
                                                       r"\(data object .*\): run the same diffrep extract command "
                                                       r"again: it re-runs exactly those shards$"):
            cache.load(10, 90)
        np.testing.assert_array_equal(cache.load(4, 90), open_cache(reference, "cifar10", "test", BACKBONE).load(4, 90))

    result = _extract(data_root, cache_dir, "--synchronous")
    assert result.exit_code == 0, result.output
    assert "damaged" in result.output
    if case.startswith("labels"):
        assert "wrote 0 shards" in result.output and "index/label: 2 chunk(s) damaged, rewritten" in result.output
        redone = []
    elif case.startswith("validity"):  # index chunk 1 holds the rows of shards 2 and 3: both run again
        assert "wrote 2 shards" in result.output and "2 shards were already complete" in result.output
        redone = ["b4/t90/c/2/", "b10/t90/c/2/", "b4/t90/c/3/", "b10/t90/c/3/"]
    else:
        shard = 3 if "last" in case else 2
        assert "b10/t90: 1 shard(s) marked done but damaged, re-run" in result.output
        assert "wrote 1 shards" in result.output and "3 shards were already complete" in result.output
        redone = [f"b10/t90/c/{shard}/"]
    assert _files(cache_dir) == _files(reference), "the repaired cache equals the untouched one, bit for bit"
    after = _stamps(group)
    # data objects other than the redone ones are never rewritten (the one marker object per array is)
    kept = [name for name in before if name.startswith("b") and not name.startswith(tuple(redone))
            and not name.endswith("zarr.json")]
    assert kept and all(after[name] == before[name] for name in kept), "only the damaged shards are rewritten"
    again = _extract(data_root, cache_dir, "--synchronous")
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_knn_and_probe_refuse_a_damaged_cache_in_one_line(reference, tmp_path):
    cache_dir, _ = _copy(reference, tmp_path)
    train = cache_dir / "cifar10" / "train" / BACKBONE
    _tamper(train, "b10/t90/c/1/0/0/0", "delete")
    common = ["--dataset", "cifar10", "--cache-dir", str(cache_dir), "--config", "32x32_small",
              "--results", str(tmp_path / "results.parquet")]
    result = CliRunner().invoke(main, ["knn", *common, "-b", "10", "-t", "90", "--pool", "1", "--k", "3"])
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)  # the advice is the exact command that redoes the shard (pipeline.advice)
    assert line.startswith(f"array b10/t90 of {train} has 1 damaged shard(s) 1 (data object missing): run diffrep "
                           f"extract --dataset cifar10 --split train --config 32x32_small --weight-seed 0 --blocks 10 "
                           f"--timesteps 90 --pool 4 --shard-size 10 ") and line.endswith(f"--cache-dir {cache_dir}")
    shutil.rmtree(cache_dir / "cifar10" / "test" / BACKBONE / "index" / "label" / "c")
    result = CliRunner().invoke(main, ["probe", *common, "-b", "4", "-t", "90"])
    assert result.exit_code == 1, result.output
    assert "index/label of cache" in _one_error_line(result) and "it rewrites them" in _one_error_line(result)
    assert not (tmp_path / "results.parquet").exists(), "nothing is scored on damaged features"


def test_verify_finds_what_keeps_its_size_and_repair_lets_extract_redo_it(reference, data_root, tmp_path):
    cache_dir, group = _copy(reference, tmp_path)
    clean = CliRunner().invoke(main, ["verify", "--cache-dir", str(cache_dir)])
    assert clean.exit_code == 0, clean.output
    assert f"{group}: 2 arrays, 8 shards read: ok" in clean.output
    assert clean.output.strip().splitlines()[-1] == "verified 2 cache(s): every written shard reads back as written"
    with open(group / "b4/t90/c/1/0/0/0", "r+b") as handle:  # one flipped bit: same size, zarr still decodes it
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    assert "nothing to do" in _extract(data_root, cache_dir, "--synchronous").output, "the cheap checks cannot see it"
    found = CliRunner().invoke(main, ["verify", "--cache-dir", str(cache_dir), "--split", "test"])
    assert found.exit_code == 1
    lines = found.output.strip().splitlines()
    assert lines[0] == f"{group}: b4/t90 shard 1: checksum mismatch (the data changed after it was written)"
    assert lines[1] == f"{group}: 2 arrays, 8 shards read: 1 bad"
    assert lines[2] == ("Error: 1 bad shard(s) or index chunk(s) in 1 cache(s) (listed above): run diffrep verify "
                        "again with --repair, then the same diffrep extract command: it writes exactly those again")
    repaired = CliRunner().invoke(main, ["verify", "--cache-dir", str(cache_dir), "--repair"])
    assert repaired.exit_code == 1 and "1 bad (reset)" in repaired.output
    redo = _extract(data_root, cache_dir, "--synchronous")
    assert redo.exit_code == 0 and "wrote 1 shards" in redo.output, redo.output
    assert _files(cache_dir) == _files(reference)
    assert CliRunner().invoke(main, ["verify", "--cache-dir", str(cache_dir)]).exit_code == 0


@pytest.mark.parametrize("node", ["", "b4/t90"])
def test_garbage_metadata_stops_extract_and_readers_in_one_line(reference, data_root, tmp_path, node):
    cache_dir, group = _copy(reference, tmp_path)
    (group / node / "zarr.json").write_text("{not json")
    result = _extract(data_root, cache_dir, "--synchronous")
    assert result.exit_code == 1
    message = _one_error_line(result)
    assert message.startswith(f"cache metadata {group / node / 'zarr.json'} is damaged (not JSON: ")
    assert "Traceback" not in result.output
    knn = CliRunner().invoke(main, ["knn", "--dataset", "cifar10", "--cache-dir", str(cache_dir), "--config",
                                    "32x32_small", "-b", "4", "-t", "90", "--k", "3",
                                    "--results", str(tmp_path / "r.parquet")])
    assert knn.exit_code == 1 and _one_error_line(knn) == message
    assert _files(cache_dir / "cifar10" / "train") == _files(reference / "cifar10" / "train"), "nothing else touched"


def test_a_cache_dir_below_a_file_or_on_proc_is_refused_before_anything_is_written(data_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = _extract(data_root, blocker / "cache", "--synchronous", "--split", "test")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert _one_error_line(result) == (f"--cache-dir {blocker / 'cache'} lies below {blocker}, which is a file, "
                                       f"not a folder: pass a --cache-dir in a folder")
    result = _extract(data_root, "/proc/diffrep-cache", "--synchronous", "--split", "test")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert _one_error_line(result) == ("--cache-dir /proc/diffrep-cache is on /proc, which is not a writable filesystem "
                                       "(a pseudo-filesystem with no storage, like /proc): pass a --cache-dir on a disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_busy_cache_is_refused_before_any_cluster_starts(data_root, tmp_path, monkeypatch):
    import pipeline.cluster as cluster

    def no_cluster(**kwargs):
        raise AssertionError("a cluster was started although the cache is busy")

    monkeypatch.setattr(cluster, "open_runner", no_cluster)
    lock = tmp_path / "cifar10" / "test" / f"{BACKBONE}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on elsewhere")
        held.flush()
        result = _extract(data_root, tmp_path, "--split", "test", "--workers", "1")
    assert result.exit_code == 1, result.output
    assert _one_error_line(result) == (f"another diffrep extract (pid 12345 on elsewhere) is writing "
                                       f"{tmp_path / 'cifar10' / 'test' / BACKBONE}: wait for it to finish, or use "
                                       f"another --cache-dir")
    assert "running on" not in result.output and not (tmp_path / "cifar10" / "test" / BACKBONE).exists()


def test_a_dry_run_with_a_mistyped_data_root_unpacks_nothing(shared_dir, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    typo = tmp_path / "dtaa"
    result = CliRunner().invoke(main, ["extract", *COMMON, "--split", "test", "--per-class", "4", "--data-root",
                                       str(typo), "--cache-dir", str(tmp_path / "cache"), "--dry-run"])
    assert result.exit_code == 0, result.output
    archive = shared_dir / "data" / "cifar10-jpg.tar.gz"
    assert f"would unpack {archive} (" in result.output and f" into {typo / 'cifar10-jpg'} first" in result.output
    assert "extract cifar10/test: 40 images (per_class=4), 4 shards of 10" in result.output
    assert sorted(tmp_path.rglob("*")) == before, "a dry run writes nothing: no data root, no lock, no cache"


def test_the_index_listed_from_the_archive_is_the_unpacked_one(shared_dir, cifar10_root, tmp_path):
    from pipeline.datasets import build_index

    listed = build_index("cifar10", "test", root=tmp_path / "nowhere", unpack=False)
    unpacked = build_index("cifar10", "test", root=Path(cifar10_root).parent)
    assert listed.pending_unpack[1] == str(tmp_path / "nowhere" / "cifar10-jpg")
    assert listed.pending_unpack[2] > 10_000 * 500, "the size of what would be unpacked (both splits)"
    assert listed.relative_paths() == unpacked.relative_paths() and listed.num_images == 10_000
    assert np.array_equal(listed.labels, unpacked.labels) and listed.class_names == unpacked.class_names
    assert not (tmp_path / "nowhere").exists()


def test_a_dry_run_on_an_existing_cache_changes_nothing(reference, data_root, tmp_path):
    cache_dir, group = _copy(reference, tmp_path)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in cache_dir.rglob("*")}
    result = _extract(data_root, cache_dir, "--timesteps", "90,300", "--dry-run")
    assert result.exit_code == 0 and "b4/t300: (40, 32, 4, 4) float16" in result.output, result.output
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in cache_dir.rglob("*")} == before


def test_split_dir_points_one_split_elsewhere(data_root, tmp_path):
    result = CliRunner().invoke(main, ["extract", *COMMON, "--split", "test", "--data-root", str(tmp_path / "empty"),
                                       "--split-dir", str(data_root / "cifar10-jpg" / "test"),
                                       "--cache-dir", str(tmp_path / "cache"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "extract cifar10/test: 40 images, 4 shards of 10" in result.output
    both = CliRunner().invoke(main, ["extract", *COMMON, "--split-dir", str(data_root), "--cache-dir", str(tmp_path)])
    assert both.exit_code == 2
    assert "--split-dir is the folder of one split: pass --split too (one of train, test)" in both.output


def test_pool_zero_is_refused_rather_than_read_as_none(tmp_path):
    result = CliRunner().invoke(main, ["extract", *COMMON, "--pool", "0", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "pool size 0 must be at least 1: write 'none' to keep full maps" in result.output
    assert not any(tmp_path.iterdir())


def test_ctrl_c_in_process_prints_one_line_and_keeps_finished_shards(reference, data_root, tmp_path, monkeypatch):
    import extract.job as job

    real, calls = job.write_shard_data, []

    def interrupt_the_third_write(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "write_shard_data", interrupt_the_third_write)
    result = _extract(data_root, tmp_path, "--split", "test", "--synchronous")
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == (
        "interrupted: 2 of 4 shards finished and are kept; run the same command again to do the other 2")
    assert "Traceback" not in result.output
    assert open_cache(tmp_path, "cifar10", "test", BACKBONE).missing_shards(10, 90) == [2, 3]
    monkeypatch.setattr(job, "write_shard_data", real)
    resumed = _extract(data_root, tmp_path, "--split", "test", "--synchronous")
    assert resumed.exit_code == 0 and "wrote 2 shards" in resumed.output, resumed.output
    assert _files(tmp_path / "cifar10" / "test") == _files(reference / "cifar10" / "test")


def test_ctrl_c_while_planning_says_nothing_ran(data_root, tmp_path, monkeypatch):
    import pipeline.extraction_run as extraction_run

    def interrupted(request, dry_run=False, **_):
        raise KeyboardInterrupt

    monkeypatch.setattr(extraction_run, "plan_extraction", interrupted)
    result = _extract(data_root, tmp_path, "--split", "test", "--synchronous")
    assert result.exit_code == 130
    assert result.output.strip().splitlines() == [
        "interrupted while planning, before any shard ran: run the same command again"]
    assert not any(tmp_path.iterdir())


@pytest.mark.e2e
def test_ctrl_c_stops_extract_in_one_line_and_the_same_command_resumes(reference, data_root, tmp_path):
    cache_dir, hold = tmp_path / "cache", tmp_path / "hold"
    hold.mkdir()
    args = [str(Path(sys.executable).parent / "diffrep"), "extract", *COMMON, "--data-root", str(data_root),
            "--cache-dir", str(cache_dir), "--split", "test", "--workers", "1"]
    env = {**os.environ, "DIFFREP_TEST_HOLD_AFTER_WRITES": f"1:{hold}",  # the worker writes one shard, then waits
           "DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{TESTS / "write_hooks.py"}"]'}
    # SIGINT back to its default in the child: a shell starting the tests in the background (`pytest &`)
    # hands them SIGINT ignored, and Python keeps an ignored SIGINT ignored
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300  # a guard against a run that never gets there, not a race
        while not (_first_shard_marked(cache_dir) and (hold / "held").exists()):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no shard was marked in 300 s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
        out, err = process.communicate(timeout=900)  # a guard against a hang, not a race: a loaded machine is slow to stop a cluster
    finally:
        (hold / "release").touch()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["interrupted: 1 of 4 shards finished and are kept; run the same command again to do the other 3"]
    assert open_cache(cache_dir, "cifar10", "test", BACKBONE).missing_shards(4, 90) == [1, 2, 3]
    resumed = _extract(data_root, cache_dir, "--split", "test", "--synchronous")
    assert resumed.exit_code == 0 and "wrote 3 shards" in resumed.output, resumed.output
    assert _files(cache_dir / "cifar10" / "test") == _files(reference / "cifar10" / "test")


def _first_shard_marked(cache_dir) -> bool:
    """Whether the run has marked shard 0 of both arrays (markers are written b10, then b4)."""
    markers = cache_dir / "cifar10" / "test" / BACKBONE / "done" / "b4" / "t90" / "c"
    if not (markers.is_dir() and any(markers.iterdir())):
        return False
    cache = open_cache(cache_dir, "cifar10", "test", BACKBONE)
    return cache.missing_shards(10, 90) == cache.missing_shards(4, 90) == [1, 2, 3]


def test_repair_waits_for_a_running_extract(reference, tmp_path):
    cache_dir, group = _copy(reference, tmp_path)
    os.remove(group / "b4/t90/c/1/0/0/0")
    with open(str(group) + ".lock", "a+") as held:  # a running extract rewrites the markers' one object
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("pid 4242 on gpu7")
        held.flush()
        result = CliRunner().invoke(main, ["verify", "--cache-dir", str(cache_dir), "--split", "test", "--repair"])
    assert result.exit_code == 1
    assert _one_error_line(result) == (f"diffrep extract (pid 4242 on gpu7) is writing {group}: run verify --repair "
                                       "again when it has finished")
    assert open_cache(cache_dir, "cifar10", "test", BACKBONE).damaged_shards(4, 90) == {1: "missing"}, "nothing reset"
    repaired = CliRunner().invoke(main, ["verify", "--cache-dir", str(cache_dir), "--split", "test", "--repair"])
    assert repaired.exit_code == 1 and "1 bad (reset)" in repaired.output
    assert open_cache(cache_dir, "cifar10", "test", BACKBONE).missing_shards(4, 90) == [1]
