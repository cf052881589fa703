"""Planning an extraction at ImageNet's real shape (class-sorted index, 1,281,167 images), without decoding an image.

The plan is what ``diffrep extract --dry-run`` prints: its row order, ``--limit`` subset and object
count are checked here against independent arithmetic on synthetic indexes.
"""

import dataclasses
import os

import numpy as np
import pytest
import zarr

from extract.cache import create_cache
from extract.errors import CacheMismatchError
from pipeline.datasets import ImageIndex
from pipeline.extraction import ExtractionRequest, plan_extraction

IMAGENET_TRAIN = 1_281_167


def _index(sizes, dataset="imagenet"):
    """A class-sorted index (as ``build_index`` lists every dataset) with ``sizes[c]`` images of class c."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    names = [f"n{c:08d}" for c in range(len(sizes))]
    root = f"/data/{dataset}/train"
    paths = [f"{root}/{names[label]}/{names[label]}_{i}.JPEG" for i, label in enumerate(labels.tolist())]
    return ImageIndex(dataset=dataset, split="train", root=root, paths=paths, labels=labels, class_names=names)


def _request(cache_dir, **changes):
    fields = dict(dataset="imagenet", split="train", timesteps=(90, 150, 300), blocks=(19, 24, 30),
                  cache_dir=str(cache_dir), config_name="256x256_uncond", pool=16, shard_size=256)
    return ExtractionRequest(**{**fields, **changes})


def test_an_imagenet_sized_plan_counts_its_objects_and_mixes_its_rows(tmp_path):
    sizes = np.full(1000, IMAGENET_TRAIN // 1000)
    sizes[: IMAGENET_TRAIN % 1000] += 1
    index = _index(sizes)
    assert index.num_images == IMAGENET_TRAIN
    plan = plan_extraction(_request(tmp_path), dry_run=True, index=index)

    shards = -(-IMAGENET_TRAIN // 256)
    arrays = 3 * 3
    index_chunks = -(-IMAGENET_TRAIN // (256 * 1024))  # index objects of 1,024 whole shards
    expected = {
        "data": arrays * shards,  # one object per shard of every (b, t) array
        "markers": arrays,  # one marker object per array
        "index": 5 * index_chunks,  # path, label, valid, error, image_id
        "metadata": 1 + 1 + 5 + 3 + arrays + 1 + 3 + arrays,  # root, index, its arrays, b groups, arrays, done, ...
    }
    assert (shards, index_chunks) == (5005, 5)
    assert {k: plan.objects[k] for k in expected} == expected and plan.objects["total"] == sum(expected.values())
    assert f"objects: {sum(expected.values()):,} files when complete (45,045 data shards, 9 marker, 25 index, 32 " \
           "metadata)" in plan.describe()
    assert "rows in a seeded order (--order-seed 0)" in plan.describe()
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"

    assert len(plan.jobs) == shards and plan.forwards == 3 * IMAGENET_TRAIN
    order = plan.order
    first = plan.jobs[0]
    assert first.image_ids == tuple(order[:256].tolist())
    assert first.paths == tuple(index.paths[i] for i in first.image_ids), "paths and noise keys follow the rows"
    rows = index.labels[order]
    assert len(np.unique(rows[:IMAGENET_TRAIN // 10])) == 1000, "the first 10% of rows hold every class"
    assert len(np.unique(rows[:256])) > 200, "a single shard mixes hundreds of classes"
    assert len(np.unique(index.labels[:IMAGENET_TRAIN // 10])) == 100, "where the index order holds 100"


def test_limit_is_class_balanced_on_a_class_sorted_index_and_its_rows_are_mixed(tmp_path):
    sizes = np.random.default_rng(0).integers(20, 60, size=100)  # uneven classes, sorted as every index
    index = _index(sizes, dataset="toy")
    plan = plan_extraction(_request(tmp_path, dataset="toy", limit=1000, shard_size=50), dry_run=True, index=index)
    assert plan.spec.num_images == 1000 and plan.spec.subset == "limit=1000"
    counts = np.bincount(plan.labels, minlength=100)
    assert counts.min() == counts.max() == 10, "10 images of each of the 100 classes, not the first 1,000 rows"
    firsts = {label: index.paths.index(next(p for p, lab in zip(index.paths, index.labels) if lab == label))
              for label in range(100)}
    assert all(plan.paths[10 * label] == index.paths[firsts[label]] for label in range(100)), "the first of each class"
    covered = len(np.unique(plan.labels[plan.order][:100]))
    assert covered >= 90, f"the first 10% of cache rows cover {covered} of 100 classes"


def test_a_resume_on_another_device_kind_is_refused_in_one_line(tmp_path):
    index = _index(np.full(4, 8), dataset="toy")
    request = _request(tmp_path, dataset="toy", config_name="32x32_small", blocks=(4,), timesteps=(90,), pool=4,
                       shard_size=8, device="cpu")
    plan = plan_extraction(request, dry_run=True, index=index)
    create_cache(request.cache_dir, plan.spec, plan.paths, plan.labels, plan.class_names, arrays=plan.shapes)
    array = zarr.open_group(plan.path, mode="r+")["b4/t90"]
    array.attrs["compute"] = {"device": "cuda", "gpu": "NVIDIA H200", "precision": "bf16",
                              "tf32": {"matmul": False, "cudnn": True}}  # as if a GPU had written its first shards
    with pytest.raises(CacheMismatchError) as info:
        plan_extraction(request, dry_run=True, index=index)
    assert str(info.value) == (
        "array b4/t90 was computed on cuda (NVIDIA H200, bf16, TF32 matmul off / cudnn on), this run computes on "
        "cpu (fp32): one array must not mix them; resume with --device cuda --precision bf16, or extract into a "
        "new --cache-dir")
    auto = plan_extraction(dataclasses.replace(request, device="auto"), dry_run=True, index=index)
    assert all(job.recorded_compute == (("b4/t90", dict(array.attrs["compute"])),) for job in auto.jobs), \
        "with --device auto each worker checks its own device before computing"
    assert os.path.isdir(plan.path)
