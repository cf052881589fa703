"""``diffrep extract`` end to end on 300 real CIFAR-10 images: in-process, LocalCluster, a real scheduler, crashes, resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from extract.cache import open_cache
from pipeline.cli.main import main

BACKBONE = "32x32_small-random0"
PER_CLASS = 30
CORRUPT = ("cat", "0003.jpg")
ARGS = ["extract", "--dataset", "cifar10", "--split", "test", "--config", "32x32_small", "--timesteps", "90,300",
        "--blocks", "4,10,12", "--pool", "4", "--shard-size", "50", "--batch-size", "25", "--threads", "1",
        "--no-progress"]
BIN = Path(sys.executable).parent
CRASH = Path(__file__).resolve().parents[1] / "write_hooks.py"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, cifar10_root):
    """A data root with the first 30 test images of each class (300), one of them a truncated JPEG."""
    root = tmp_path_factory.mktemp("data")
    for class_dir in sorted((Path(cifar10_root) / "test").iterdir()):
        target = root / "cifar10-jpg" / "test" / class_dir.name
        target.mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:PER_CLASS]:
            shutil.copyfile(image, target / image.name)
    corrupt = root / "cifar10-jpg" / "test" / CORRUPT[0] / CORRUPT[1]
    corrupt.write_bytes(corrupt.read_bytes()[:120])
    return root


def _extract(data_root, cache_dir, *extra, env=None):
    result = CliRunner().invoke(main, [*ARGS, "--data-root", str(data_root), "--cache-dir", str(cache_dir), *extra],
                                env=env, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The cache written in-process (--synchronous), and the command's output."""
    cache_dir = tmp_path_factory.mktemp("reference")
    result = _extract(data_root, cache_dir, "--synchronous")
    assert result.exit_code == 0, result.output
    return cache_dir, result.output


def _assert_same_cache(expected_dir, actual_dir):
    expected = open_cache(expected_dir, "cifar10", "test", BACKBONE)
    actual = open_cache(actual_dir, "cifar10", "test", BACKBONE)
    assert actual.spec == expected.spec and actual.arrays() == expected.arrays()
    for name in ("labels", "valid", "errors", "paths"):
        assert np.array_equal(np.asarray(getattr(actual, name)), np.asarray(getattr(expected, name))), name
    for b, t in expected.arrays():
        assert actual.is_complete(b, t)
        a, e = actual.load(b, t), expected.load(b, t)
        assert a.shape == e.shape and np.array_equal(a.view(np.uint16), e.view(np.uint16)), f"b{b}/t{t} differs"


def _corrupt_row(cache):
    return next(i for i, p in enumerate(cache.paths) if p.endswith(os.path.join(*CORRUPT)))


@pytest.mark.e2e
def test_in_process_run_writes_everything_and_reports_the_corrupt_jpeg(reference):
    cache_dir, output = reference
    assert "300 images" in output and "(300, 64, 4, 4)" in output and "600 forwards" in output
    assert "1 image(s) could not be read" in output and os.path.join(*CORRUPT) in output
    cache = open_cache(cache_dir, "cifar10", "test", BACKBONE)
    row = _corrupt_row(cache)
    assert list(np.flatnonzero(~cache.valid)) == [row] and cache.errors[row]
    assert zarr.open_group(cache.path).attrs["invalid_images"] == [
        {"index": row, "path": cache.paths[row], "reason": cache.errors[row]}]
    assert cache.arrays() == [(b, t) for b in (4, 10, 12) for t in (90, 300)]
    features = cache.load(12, 300)
    assert features.shape == (300, 64, 4, 4) and not features[row].any()
    assert np.abs(features[np.arange(300) != row]).sum(axis=(1, 2, 3)).min() > 0
    assert sorted(cache.image_ids) == list(range(300)) and list(cache.labels) == list(cache.image_ids // PER_CLASS)
    assert len(set(cache.labels[:30])) == 10, "the rows of the class-sorted index are mixed: 10% of rows, every class"


@pytest.mark.e2e
def test_two_worker_local_cluster_writes_the_same_bits(reference, data_root, tmp_path):
    result = _extract(data_root, tmp_path, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "local Dask cluster, 2 worker processes" in result.output
    assert os.path.join(*CORRUPT) in result.output
    _assert_same_cache(reference[0], tmp_path)


@pytest.mark.e2e
def test_a_run_killed_half_way_resumes_to_the_same_bits(reference, data_root, tmp_path):
    command = [sys.executable, str(CRASH), *ARGS, "--data-root", str(data_root), "--cache-dir", str(tmp_path),
               "--synchronous"]
    env = {**os.environ, "DIFFREP_TEST_CRASH_AFTER_WRITES": "5"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert killed.returncode == 3, killed.stderr
    partial = open_cache(tmp_path, "cifar10", "test", BACKBONE)
    # shard 2 wrote its t=90 data before the crash, but only a finished job's shard is marked
    assert partial.missing_shards(12, 90) == partial.missing_shards(12, 300) == [2, 3, 4, 5]
    resumed = _extract(data_root, tmp_path, "--synchronous")
    assert resumed.exit_code == 0, resumed.output
    assert "wrote 4 shards" in resumed.output and "2 shards were already complete" in resumed.output
    _assert_same_cache(reference[0], tmp_path)


@pytest.mark.e2e
def test_a_killed_worker_loses_only_its_shard(reference, data_root, tmp_path):
    sentinel = tmp_path / "crashed"
    cache_dir = tmp_path / "cache"
    import dask

    with dask.config.set({"distributed.worker.preload": [str(CRASH)]}):  # workers wrap write_shard_data at start
        result = _extract(data_root, cache_dir, "--workers", "2",
                          env={"DIFFREP_TEST_CRASH_AFTER_WRITES": f"3:{sentinel}"})
    assert sentinel.exists(), "a worker process was killed mid-shard"
    assert result.exit_code == 0, result.output
    _assert_same_cache(reference[0], cache_dir)


@pytest.mark.e2e
def test_adding_timesteps_and_blocks_writes_only_what_is_new(reference, data_root, tmp_path):
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    group = Path(tmp_path, "cifar10", "test", BACKBONE)
    old = {p: p.stat().st_mtime_ns for p in group.glob("b*/t*/c/**/*") if p.is_file()}
    extra = ["--timesteps", "90,300,500", "--blocks", "4,10,12,13", "--synchronous"]
    plan = _extract(data_root, tmp_path, *extra, "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert "b12/t300: (300, 64, 4, 4) float16, 614.4 KB  [complete, skipped]" in plan.output
    assert "b13/t90: (300, 64, 4, 4) float16, 614.4 KB  [new]" in plan.output
    assert "6 shard tasks, 300 images, 900 forwards" in plan.output
    result = _extract(data_root, tmp_path, *extra)
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in old} == old, "complete arrays were not rewritten"
    cache = open_cache(tmp_path, "cifar10", "test", BACKBONE)
    assert all(cache.is_complete(b, t) for b in (4, 10, 12, 13) for t in (90, 300, 500))
    again = _extract(data_root, tmp_path, *extra)
    assert "every requested array is complete" in again.output


@pytest.mark.e2e
def test_extract_through_a_real_scheduler_and_worker(reference, data_root, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    processes = []
    try:
        processes.append(subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scheduler_file.exists(), "dask scheduler did not start within 60 s"
        processes.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
             "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        address = json.loads(scheduler_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="300s") as client:
            client.wait_for_workers(1, timeout=600)
        result = _extract(data_root, tmp_path / "cache", "--scheduler", address)
        assert result.exit_code == 0, result.output
        assert f"Dask cluster at {address}" in result.output
        _assert_same_cache(reference[0], tmp_path / "cache")
    finally:
        for process in reversed(processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.mark.e2e
def test_mismatched_cache_is_refused_with_the_fix(reference, data_root):
    result = _extract(data_root, reference[0], "--synchronous", "--noise-seed", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: cache was written with noise_seed=0, asked for 1: pass --noise-seed 0 or use a new --cache-dir")
    result = _extract(data_root, reference[0], "--synchronous", "--pool", "8")
    assert result.exit_code == 1 and "cache was written with pool=4, asked for 8: pass --pool 4" in result.output


@pytest.mark.parametrize("extra,message", [
    (["--blocks", "4,40"], "Error: block 40 is out of range for 32x32_small: valid blocks are 1..19"),
    (["--timesteps", "90,1000"], "Error: timestep 1000 is out of range for the linear schedule: valid timesteps are 0..999"),
    (["--dataset", "nosuchdata"], "Error: "),
])
def test_bad_blocks_timesteps_and_datasets_fail_in_one_line(tmp_path, extra, message):
    result = CliRunner().invoke(main, [*ARGS, "--cache-dir", str(tmp_path), "--synchronous", *extra])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    if "--dataset" in extra:
        assert "nosuchdata" in lines[0]
    assert not any(tmp_path.iterdir()), "nothing is written before the checks pass"


def test_a_bad_checkpoint_is_refused_before_any_task_runs(tmp_path):
    import torch

    from extract.backbone.configs import get_config

    wrong = tmp_path / "wrong.pt"
    torch.save(get_config("32x32_small").build(learn_sigma=False).state_dict(), wrong)
    cache_dir = tmp_path / "cache"
    result = CliRunner().invoke(main, [*ARGS, "--cache-dir", str(cache_dir), "--checkpoint", str(wrong)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "checkpoint does not fit 32x32_small" in lines[0] and "learn_sigma=False" in lines[0]
    assert not cache_dir.exists()


def test_a_setting_that_fails_every_shard_stops_the_run(data_root, tmp_path):
    result = _extract(data_root, tmp_path, "--synchronous", "--precision", "fp16", "--device", "cpu")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == "Error: precision fp16 needs a GPU: use --precision bf16 or fp32 on the CPU"
    cache = open_cache(tmp_path, "cifar10", "test", BACKBONE)
    assert cache.missing_shards(4, 90) == list(range(cache.num_shards)), "no shard is written, none is marked done"


def test_disk_too_small_is_refused_before_anything_is_written(data_root, tmp_path, monkeypatch):
    import pipeline.extraction as extraction

    monkeypatch.setattr(extraction.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    result = _extract(data_root, tmp_path, "--synchronous")
    assert result.exit_code == 1
    assert "extract needs 3.1 MB in" in result.output and "but only 1.0 KB is free: free space" in result.output
    assert not any(tmp_path.iterdir())
    dry = _extract(data_root, tmp_path, "--dry-run")
    assert dry.exit_code == 0 and "disk: 3.1 MB to write, 1.0 KB free" in dry.output


@pytest.mark.e2e
def test_plain_zarr_sees_the_cache(reference):
    group = zarr.open_group(os.path.join(reference[0], "cifar10", "test", BACKBONE), mode="r")
    assert group["b10/t90"].shape == (300, 64, 4, 4) and group["b10/t90"].dtype == np.float16
    assert group.attrs["diffrep"]["spec"]["pool"] == 4


def test_a_second_run_on_the_same_cache_is_refused_while_the_first_holds_it(data_root, tmp_path):
    import fcntl

    from extract.errors import CacheError
    from pipeline.cluster import TaskRunner
    from pipeline.extraction import ExtractionRequest, plan_extraction
    from pipeline.extraction_run import run_extraction

    request = ExtractionRequest(dataset="cifar10", split="test", timesteps=(90,), blocks=(4,), cache_dir=str(tmp_path),
                                config_name="32x32_small", pool=4, limit=10, data_root=str(data_root))
    plan = plan_extraction(request)
    os.makedirs(os.path.dirname(plan.path))
    with open(plan.path + ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on elsewhere")
        held.flush()
        with pytest.raises(CacheError, match=r"another diffrep extract \(pid 12345 on elsewhere\) is writing .*another --cache-dir"):
            run_extraction(plan, TaskRunner(), progress=False)
        assert not os.path.exists(plan.path), "nothing may be written while another run holds the cache"
    summary = run_extraction(plan, TaskRunner(), progress=False)
    assert summary.shards_done == 1 and open_cache(tmp_path, "cifar10", "test", BACKBONE).is_complete(4, 90)


def test_a_busy_cache_stops_fill_caches_before_anything_is_written_or_started(data_root, tmp_path, monkeypatch):
    """The CLI and the demo both go through fill_caches: every cache is locked before any is written or a runner opens."""
    import fcntl

    import pipeline.extraction_run as extraction_run
    from extract.errors import CacheError
    from pipeline.extraction import ExtractionRequest, plan_extraction

    def no_runner(**kwargs):
        raise AssertionError("a runner was opened while a cache was held")

    monkeypatch.setattr(extraction_run, "open_runner", no_runner)
    free, busy = (ExtractionRequest(dataset="cifar10", split="test", timesteps=(90,), blocks=(4,), config_name="32x32_small",
                                    cache_dir=str(tmp_path / name), pool=4, limit=10, data_root=str(data_root))
                  for name in ("free", "busy"))
    free_path, busy_path = plan_extraction(free).path, plan_extraction(busy).path
    os.makedirs(os.path.dirname(busy_path))
    echoed = []
    with open(busy_path + ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on elsewhere")
        held.flush()
        with pytest.raises(CacheError, match=r"another diffrep extract \(pid 12345 on elsewhere\) is writing .*busy"):
            extraction_run.fill_caches([free, busy], progress=False, echo=echoed.append)
    assert [line.splitlines()[0] for line in echoed] == ["extract cifar10/test: 10 images (limit=10), 1 shards of 256"] * 2
    assert not os.path.exists(free_path), "the free cache waits for the busy one: nothing is written"


def test_resuming_with_another_batch_size_or_thread_count_is_refused(data_root, tmp_path):
    from extract.errors import CacheMismatchError
    from pipeline.cluster import TaskRunner
    from pipeline.extraction import ExtractionRequest, plan_extraction
    from pipeline.extraction_run import run_extraction

    def request(**changes):
        base = dict(dataset="cifar10", split="test", timesteps=(90,), blocks=(4,), cache_dir=str(tmp_path),
                    config_name="32x32_small", pool=4, limit=12, data_root=str(data_root), batch_size=4, num_threads=1)
        return ExtractionRequest(**{**base, **changes})

    run_extraction(plan_extraction(request()), TaskRunner(), progress=False)
    with pytest.raises(CacheMismatchError, match=r"written with --batch-size 4 --threads 1, asked for --batch-size 8 --threads 1"):
        plan_extraction(request(batch_size=8, timesteps=(90, 300)))
    with pytest.raises(CacheMismatchError, match=r"asked for --batch-size 4 --threads 2"):
        plan_extraction(request(num_threads=2))
    assert plan_extraction(request(timesteps=(90, 300))).new_arrays == [(4, 300)]


@pytest.mark.e2e
def test_a_full_disk_mid_run_stops_with_one_line_and_keeps_finished_shards(reference, data_root, tmp_path, monkeypatch):
    import errno

    import extract.job as job

    real_write, calls = job.write_shard_data, []

    def fill_up_after_two(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(job, "write_shard_data", fill_up_after_two)
    result = _extract(data_root, tmp_path, "--synchronous")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: disk full while writing shard ")
    assert "free space and run the same command again" in result.output
    assert len(calls) == 3, "the run stops at the first full-disk write, without retries"
    cache = open_cache(tmp_path, "cifar10", "test", BACKBONE)
    # shard 0 wrote t=90 and t=300 (two writes); shard 1's first write hit the full disk
    assert cache.missing_shards(4, 90) == cache.missing_shards(4, 300) == [1, 2, 3, 4, 5]
    monkeypatch.setattr(job, "write_shard_data", real_write)
    resumed = _extract(data_root, tmp_path, "--synchronous")
    assert resumed.exit_code == 0, resumed.output
    _assert_same_cache(reference[0], tmp_path)


def test_a_resume_that_would_mix_cpu_and_gpu_shards_in_an_array_is_refused(data_root, tmp_path):
    from extract.cache import reset_shards

    args = ["--synchronous", "--limit", "20", "--shard-size", "10", "--timesteps", "90", "--blocks", "4"]
    first = _extract(data_root, tmp_path, *args)
    assert first.exit_code == 0, first.output
    cache = open_cache(tmp_path, "cifar10", "test", BACKBONE)
    assert cache.compute(4, 90) == {"device": "cpu", "gpu": "", "precision": "fp32", "tf32": None}
    assert cache.runs[-1]["compute"] == [cache.compute(4, 90)]
    group = zarr.open_group(cache.path, mode="r+")
    group["b4/t90"].attrs["compute"] = {"device": "cuda", "gpu": "NVIDIA H200", "precision": "bf16",
                                        "tf32": {"matmul": True, "cudnn": True}}  # as if a GPU had written it
    reset_shards(cache.path, {(4, 90, 0): [1]})  # one shard left to do
    expected = ("Error: array b4/t90 was computed on cuda (NVIDIA H200, bf16, TF32 matmul on / cudnn on), this run "
                "computes on cpu (fp32): one array must not mix them; resume with --device cuda --precision bf16, or "
                "extract into a new --cache-dir")
    for device in ("cpu", "auto"):  # refused by the plan (explicit device) or by the worker before it computes
        result = _extract(data_root, tmp_path, *args, "--device", device)
        assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == expected, result.output
        assert open_cache(tmp_path, "cifar10", "test", BACKBONE).missing_shards(4, 90) == [1]
