"""The pipeline section of ``make bench`` runs end to end on a few images (a lent GPU's minutes must not go to a bug)."""

import re

from tests.bench.bench_pipeline import JPEG_SIZE, Workload, bench_pipeline_section, make_jpegs


def test_bench_jpegs_are_imagenet_sized_and_class_balanced(tmp_path, cifar10_root):
    from PIL import Image

    paths = make_jpegs(tmp_path, 20, threads=2)
    assert len(paths) == 20
    classes = [p.split("/")[-2] for p in paths]
    assert len(set(classes[:10])) == 10 and classes[:10] == classes[10:], "round-robin over the classes"
    with Image.open(paths[0]) as image:
        assert image.format == "JPEG" and image.size == JPEG_SIZE


def test_pipeline_section_dry_run(cifar10_root):
    """Both image sets through the default path, a one-worker cluster (after and before issue 23) and --synchronous."""
    small = Workload(blocks=(4,), timesteps=(25,), batch=8, shard=8, threads=1)
    lines = bench_pipeline_section(per_class=2, jpegs=20, rounds=1, before=True, workloads=[small])
    ratios = [float(m.group(1)) for line in lines
              if (m := re.search(r"(?:default|local cluster) / --synchronous = ([\d.]+)", line))]
    assert len(ratios) == 4 and all(r > 0 for r in ratios), lines
    rows = [line.split() for line in lines if line.strip().startswith(("default", "--synchronous", "--workers"))
            and "images/s" not in line]
    assert len(rows) == 8, lines  # 4 paths x 2 image sets
    assert any("decode+resize to 256" in line for line in lines)
    assert any("pure truncated forward" in line for line in lines)


def test_device_kit_sample_feeds_the_bench_without_shared(tmp_path, cifar10_root, monkeypatch):
    """``make device-kit``'s CIFAR-10 sample is a data root the bench makes its JPEGs from (no ../shared there)."""
    from tests.bench.bench_pipeline import sample_cifar10_test

    kit = tmp_path / "kit" / "cifar10-jpg"
    assert sample_cifar10_test(kit, 3) == 30
    assert sorted(len(list(c.glob("*.jpg"))) for c in (kit / "test").iterdir()) == [3] * 10
    monkeypatch.setenv("DIFFREP_DATA", str(kit.parent))
    paths = make_jpegs(tmp_path / "made", 40, threads=2)  # cycles through the 3 a class it has
    assert len(paths) == 40 and all(p.endswith(".jpg") for p in paths)
