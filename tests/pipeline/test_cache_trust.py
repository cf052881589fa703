"""Damage that keeps sizes, damaged markers, a full disk and lost array metadata, on real small caches.

Each case tampers with a cache on disk, runs the commands (CliRunner), and asserts the exit code, the
one-line message, and that nothing finished was lost: what extract repairs equals a cache never touched,
byte for byte.
"""

import errno

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from extract.cache import open_cache
from extract.errors import CacheDamagedError
from pipeline.cli.main import main
from pipeline.results import read_results
from tests.pipeline.test_extract_integrity import (  # noqa: F401  (fixtures)
    BACKBONE, _copy, _extract, _files, _one_error_line, data_root, reference,
)


def _verify(cache_dir, *extra):
    return CliRunner().invoke(main, ["verify", "--cache-dir", str(cache_dir), *extra])


def _probe(cache_dir, results, *extra):
    return CliRunner().invoke(main, ["probe", "--dataset", "cifar10", "--cache-dir", str(cache_dir), "--config",
                                     "32x32_small", "-b", "4", "-t", "90", "--results", str(results), *extra])


def _only_line(result):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0][len("Error: "):]


def _shift_labels(group):
    """index/label chunk 0 rewritten in place with every label moved to the next class: same size, same format."""
    target = group / "index" / "label" / "c" / "0"
    labels = np.frombuffer(target.read_bytes(), dtype="<i8")
    target.write_bytes(((labels + 1) % 10).astype("<i8").tobytes())
    return labels


@pytest.mark.parametrize("repair_first", [False, True])
def test_labels_changed_in_place_are_refused_and_extract_rewrites_them(reference, data_root, tmp_path, repair_first):
    original = _probe(reference, tmp_path / "original.parquet")
    assert original.exit_code == 0, original.output
    cache_dir, _ = _copy(reference, tmp_path)
    group = cache_dir / "cifar10" / "train" / BACKBONE
    _shift_labels(group)

    found = _verify(cache_dir)
    assert found.exit_code == 1
    assert f"{group}: index/label chunk 0: checksum mismatch (the values changed after they were written)" in found.output
    results = tmp_path / "results.parquet"
    message = _only_line(_probe(cache_dir, results))
    assert message == (f"index/label of cache {group} has damaged chunks 0 (checksum mismatch (the values changed after "
                       f"they were written)): run the same diffrep extract command again: it rewrites them")
    assert not results.exists(), "nothing is scored on tampered labels"
    if repair_first:
        repaired = _verify(cache_dir, "--repair")
        assert repaired.exit_code == 1 and "1 bad (reset)" in repaired.output
        assert not (group / "index" / "label" / "c" / "0").exists(), "the tampered chunk is gone, not left to be read"
    redo = _extract(data_root, cache_dir, "--synchronous")
    assert redo.exit_code == 0, redo.output
    assert "index/label: 1 chunk(s) damaged, rewritten from the dataset index" in redo.output
    assert "wrote 0 shards" in redo.output, "no feature is recomputed for a label chunk"
    assert _files(cache_dir) == _files(reference)
    assert _verify(cache_dir).exit_code == 0
    again = _probe(cache_dir, results)
    assert again.exit_code == 0, again.output
    assert read_results(results).to_pylist()[-1]["top1"] == read_results(tmp_path / "original.parquet").to_pylist()[-1]["top1"]


def _poison(path, values=(0x7C00, 0x7E00, 0xFC00)):
    """Some float16 values of a shard object set to +Inf, NaN and -Inf in place (same size)."""
    data = bytearray(path.read_bytes())
    for i, bits in enumerate(values):
        data[64 + 2 * i: 66 + 2 * i] = int(bits).to_bytes(2, "little")
    path.write_bytes(bytes(data))


def test_inf_and_nan_in_a_shard_are_refused_by_name_and_repaired(reference, data_root, tmp_path):
    from probe.features import StreamedFeatures

    cache_dir, _ = _copy(reference, tmp_path)
    group = cache_dir / "cifar10" / "train" / BACKBONE
    _poison(group / "b4/t90/c/1/0/0/0")
    root = cache_dir
    fix = (f"run diffrep verify --cache-dir {root} --dataset cifar10 --split train --repair, then the same diffrep "
           f"extract command again: it redoes that shard")
    assert _only_line(_probe(cache_dir, tmp_path / "r.parquet")) == (
        f"shard 1 of b4/t90 in {group} holds Inf/NaN values: {fix}")
    cache = open_cache(cache_dir, "cifar10", "train", BACKBONE)
    with pytest.raises(CacheDamagedError, match=r"^shard 1 of b4/t90 .* holds Inf/NaN values"):
        list(cache.iter_shards(4, 90))
    streamed = StreamedFeatures(cache, [(4, 90)], window_bytes=4096)  # many small windows: row slices, not shards
    with pytest.raises(CacheDamagedError, match=r"^shard 1 \(rows 10-1\d\) of b4/t90 .* holds Inf/NaN values"):
        list(streamed.batches(8, seed=0))
    found = _verify(cache_dir, "--split", "train")
    assert found.exit_code == 1 and f"{group}: b4/t90 shard 1: checksum mismatch" in found.output
    assert _verify(cache_dir, "--repair").exit_code == 1
    redo = _extract(data_root, cache_dir, "--synchronous")
    assert redo.exit_code == 0 and "wrote 1 shards" in redo.output, redo.output
    assert _files(cache_dir) == _files(reference)


def test_verify_reports_inf_even_where_the_checksum_was_taken_of_it(reference, tmp_path):
    """A cache written before the writer refused Inf: its checksum matches, the scan still names the shard."""
    from extract.cache.integrity import marker_value

    cache_dir, group = _copy(reference, tmp_path)
    target = group / "b4/t90/c/2/0/0/0"
    _poison(target)
    cache = open_cache(cache_dir, "cifar10", "test", BACKBONE)
    marker = zarr.open_group(str(group))["done/b4/t90"]
    values = marker[:]
    values[2] = marker_value(zarr.open_group(str(group))["b4/t90"][20:30])
    marker[:] = values
    assert cache.verify_shards(4, 90) == {2: "holds Inf/NaN values"}


def test_the_writer_refuses_features_with_inf(tmp_path):
    from extract.cache import write_shard_data
    from extract.errors import CacheError
    from tests.probe.test_features import make_cache

    cache, data, _, _ = make_cache(tmp_path, n=10, shard_size=5, keys=((24, 150),), invalid=())
    before = _files(tmp_path)
    bad = data[(24, 150)][:5].copy()
    bad[2, 1, 0, 0] = np.inf
    with pytest.raises(CacheError, match=r"^the features of b24 at t=150 for shard 0 hold Inf/NaN .* nothing of the "
                                         r"shard is written"):
        write_shard_data(cache.path, 0, {(24, 150): bad})
    assert _files(tmp_path) == before


def test_pass_one_from_a_cache_with_inf_is_refused_not_trained_on(tmp_path):
    from fusion.pass1_cache import find_cached_pass1
    from tests.probe.test_features import make_cache

    cache, data, _, valid = make_cache(tmp_path, n=10, shard_size=5, keys=((24, 150),), invalid=())
    paths = [f"img/{i}.jpg" for i in range(10)]
    found = find_cached_pass1(tmp_path, "toy", "train", cache.spec.backbone_id, 0, [24], 150, {24: 4}, paths)
    assert found.features is not None and np.array_equal(found.features[(24, 150)].numpy(), data[(24, 150)])
    shard = tmp_path / "toy" / "train" / cache.spec.backbone_id / "b24" / "t150" / "c" / "1" / "0" / "0" / "0"
    _poison(shard)
    with pytest.raises(CacheDamagedError, match=r"^shard 1 of b24/t150 .* holds Inf/NaN values"):
        find_cached_pass1(tmp_path, "toy", "train", cache.spec.backbone_id, 0, [24], 150, {24: 4}, paths)


def _cut_marker(group, array="b4/t90"):
    target = group / "done" / array / "c" / "0"
    assert target.stat().st_size == 32, "4 shards, one uint64 marker each"
    with open(target, "r+b") as handle:
        handle.truncate(20)


def test_a_truncated_marker_is_refused_by_name_and_redone(reference, data_root, tmp_path):
    cache_dir, _ = _copy(reference, tmp_path)
    group = cache_dir / "cifar10" / "train" / BACKBONE
    _cut_marker(group)
    assert _only_line(_probe(cache_dir, tmp_path / "r.parquet")) == (
        f"the completion markers of array b4/t90 in {group} (done/b4/t90) are damaged (20 bytes, expected 32): "
        f"run the same diffrep extract command again: it redoes the 4 shard(s) they covered")
    found = _verify(cache_dir)
    assert found.exit_code == 1, found.output
    assert f"{group}: done/b4/t90: completion markers damaged (20 bytes, expected 32): its 4 shard(s) are redone" \
        in found.output
    assert "Traceback" not in found.output
    redo = _extract(data_root, cache_dir, "--synchronous")
    assert redo.exit_code == 0, redo.output
    assert "b4/t90: 4 shard(s) marked done but damaged" in redo.output and "wrote 4 shards" in redo.output
    assert _files(cache_dir) == _files(reference)


def test_verify_repair_forgets_a_truncated_marker_and_keeps_the_data(reference, data_root, tmp_path):
    cache_dir, _ = _copy(reference, tmp_path)
    group = cache_dir / "cifar10" / "test" / BACKBONE
    _cut_marker(group)
    repaired = _verify(cache_dir, "--repair")
    assert repaired.exit_code == 1 and "1 bad (reset)" in repaired.output, repaired.output
    assert not (group / "done/b4/t90/c/0").exists() and (group / "b4/t90/c/3/0/0/0").exists()
    cache = open_cache(cache_dir, "cifar10", "test", BACKBONE)
    assert cache.missing_shards(4, 90) == [0, 1, 2, 3] and cache.is_complete(10, 90)
    redo = _extract(data_root, cache_dir, "--synchronous")
    assert redo.exit_code == 0 and "wrote 4 shards" in redo.output, redo.output
    assert _files(cache_dir) == _files(reference)
    assert _verify(cache_dir).exit_code == 0


def test_feedback_refuses_a_truncated_marker_of_a_pass_one_source(data_root, tmp_path):
    cache_dir = tmp_path / "cache"
    sources = ["--dataset", "cifar10", "--config", "32x32_small", "--data-root", str(data_root),
               "--cache-dir", str(cache_dir)]
    made = CliRunner().invoke(main, ["extract", *sources, "-b", "12,15,18", "-t", "25", "--pool", "none",
                                     "--shard-size", "10", "--no-progress", "--synchronous"])
    assert made.exit_code == 0, made.output
    group = cache_dir / "cifar10" / "train" / BACKBONE
    _cut_marker(group, "b15/t25")
    result = CliRunner().invoke(main, ["feedback", *sources, "-t", "25", "--dry-run", "--device", "cpu"])
    assert _only_line(result).startswith(f"the completion markers of array b15/t25 in {group} (done/b15/t25) are "
                                         f"damaged (20 bytes, expected 32): run the same diffrep extract command")


def test_a_full_disk_at_the_end_of_a_run_is_one_line_and_keeps_the_shards(reference, data_root, tmp_path, monkeypatch,
                                                                          caplog):
    import extract.cache.writer as writer
    import zarr.storage._local as local

    real_object, real_put, full = writer.write_shard_object, local._put, []

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def shard_then_full(array, shard, data):
        if shard >= 2:  # the disk fills while shard 2 is written: every later write fails too
            full.append(shard)
            no_space()
        return real_object(array, shard, data)

    monkeypatch.setattr(writer, "write_shard_object", shard_then_full)
    monkeypatch.setattr(local, "_put", lambda *a, **k: no_space() if full else real_put(*a, **k))
    result = _extract(data_root, tmp_path, "--split", "test", "--synchronous")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert _one_error_line(result) == (f"disk full while writing shard 2 of {tmp_path / 'cifar10/test' / BACKBONE}: "
                                       f"free space and run the same command again (completed shards are kept)")
    cache = open_cache(tmp_path, "cifar10", "test", BACKBONE)
    assert cache.missing_shards(4, 90) == [2, 3] and cache.runs == [], "the shards are kept; no history recorded"
    assert any("history was not recorded" in r.getMessage() and "disk full" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(writer, "write_shard_object", real_object)
    monkeypatch.setattr(local, "_put", real_put)
    resumed = _extract(data_root, tmp_path, "--split", "test", "--synchronous")
    assert resumed.exit_code == 0 and "wrote 2 shards" in resumed.output, resumed.output
    assert _files(tmp_path / "cifar10" / "test") == _files(reference / "cifar10" / "test")


def test_an_array_recreated_after_its_metadata_was_lost_records_what_computed_it(reference, data_root, tmp_path,
                                                                                monkeypatch):
    import extract.job as job

    cache_dir, group = _copy(reference, tmp_path)
    recorded = open_cache(cache_dir, "cifar10", "test", BACKBONE).compute(4, 90)
    assert recorded["device"] == "cpu"
    (group / "b4/t90/zarr.json").unlink()
    other = _extract(data_root, cache_dir, "--split", "test", "--synchronous", "--precision", "bf16")
    assert _one_error_line(other).startswith("cache was written with precision=fp32, asked for bf16: pass --precision fp32")
    # the array comes back on another device kind (here a GPU's settings, faked): all its shards are redone there
    real = job.compute_settings
    monkeypatch.setattr(job, "compute_settings", lambda device, precision: {**real(device, precision), "device": "cuda",
                                                                            "gpu": "Fake GPU"})
    again = _extract(data_root, cache_dir, "--split", "test", "--synchronous")
    assert again.exit_code == 0 and "wrote 4 shards" in again.output, again.output
    cache = open_cache(cache_dir, "cifar10", "test", BACKBONE)
    assert cache.compute(4, 90)["device"] == "cuda", "the re-created array records what computed its shards"
    monkeypatch.setattr(job, "compute_settings", real)
    (group / "b4/t90/c/1/0/0/0").unlink()  # one shard to redo, now on this CPU: the mix is refused
    mixed = _extract(data_root, cache_dir, "--split", "test", "--synchronous")
    assert _one_error_line(mixed).startswith("array b4/t90 was computed on cuda (Fake GPU, fp32), this run computes on "
                                             "cpu (fp32): one array must not mix them")
    assert open_cache(cache_dir, "cifar10", "test", BACKBONE).missing_shards(4, 90) == [1], "nothing else lost"
    explicit = _extract(data_root, cache_dir, "--split", "test", "--synchronous", "--device", "cpu")
    assert _one_error_line(explicit).startswith("array b4/t90 was computed on cuda")


def _forget_index_checksums(group):
    for name in ("path", "label", "valid", "error", "image_id"):
        zarr.open_array(str(group / "index" / name), mode="r+").attrs.put({})


def test_a_cache_from_before_index_checksums_stays_readable_and_gets_them(reference, data_root, tmp_path):
    cache_dir, group = _copy(reference, tmp_path)
    for split in ("train", "test"):
        _forget_index_checksums(cache_dir / "cifar10" / split / BACKBONE)
    assert _probe(cache_dir, tmp_path / "r.parquet").exit_code == 0, "nothing to compare is not damage"
    noted = _verify(cache_dir, "--split", "test")
    assert noted.exit_code == 0, noted.output
    assert f"{group}: the index has no chunk checksums (written by an older diffrep): verify --repair or the next " \
           f"extract records them" in noted.output
    recorded = _verify(cache_dir, "--split", "test", "--repair")
    assert recorded.exit_code == 0 and f"{group}: recorded the index's chunk checksums" in recorded.output
    assert _files(cache_dir / "cifar10" / "test") == _files(reference / "cifar10" / "test")
    train = cache_dir / "cifar10" / "train" / BACKBONE
    (train / "b4/t90/c/0/0/0/0").unlink()  # work to do: extract opens the cache for writing and records them
    assert _extract(data_root, cache_dir, "--synchronous").exit_code == 0
    assert _files(cache_dir) == _files(reference)
    _shift_labels(train)
    assert _verify(cache_dir).exit_code == 1


def test_index_checksums_survive_a_marking_process_killed_between_chunk_and_checksum(tmp_path):
    from extract.cache.integrity import INDEX_CHECKSUMS, PENDING_CHECKSUMS, values_checksum
    from tests.probe.test_features import make_cache

    cache, _, _, valid = make_cache(tmp_path, n=10, shard_size=5, keys=((24, 150),), invalid=(3,))
    array = zarr.open_array(f"{cache.path}/index/valid", mode="r+")
    assert array.attrs[INDEX_CHECKSUMS] == [values_checksum(valid)] and PENDING_CHECKSUMS not in array.attrs
    fresh = np.ones(10, bool)
    for old, new in ((values_checksum(valid), values_checksum(fresh)), (values_checksum(fresh), values_checksum(valid))):
        # killed after the checksums were written, before or after the chunk: either content matches one of them
        array.attrs.put({INDEX_CHECKSUMS: [new], PENDING_CHECKSUMS: {"0": old}})
        assert open_cache(tmp_path, "toy", "train", cache.spec.backbone_id).index_damage() == {}
    array.attrs.put({INDEX_CHECKSUMS: [values_checksum(fresh)]})  # no pending: the stored rows are damage
    assert open_cache(tmp_path, "toy", "train", cache.spec.backbone_id).index_damage() == {
        "valid": {0: "checksum mismatch (the values changed after they were written)"}}
