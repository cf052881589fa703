"""Cached arrays come back as float32 tensors once, invalid rows dropped, eager and streamed alike."""

import numpy as np
import pytest
import torch

from extract.cache import CacheSpec, cache_path, create_cache, open_cache, write_shard
from extract.errors import CacheError
from probe.features import in_shapes, iter_feature_batches, load_features, resolve_backbone_id


def make_cache(root, n=23, shard_size=5, keys=((24, 150), (19, 90)), invalid=(3, 17), backbone_id="32x32_small-random0",
               split="train", signal=0.0, seed=0):
    """A real cache on disk: random float16 features (plus ``signal`` on channel = label), a few rows invalid."""
    spec = CacheSpec(dataset="toy", split=split, backbone_id=backbone_id, config_name="32x32_small",
                     image_size=32, num_images=n, shard_size=shard_size, pool=4)
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    data = {}
    for key in keys:
        values = rng.normal(size=(n, 3, 4, 4))
        values[np.arange(n), labels] += signal
        data[key] = values.astype(np.float16)
    create_cache(root, spec, [f"img/{i}.jpg" for i in range(n)], labels, ["a", "b", "c"],
                 arrays={key: (3, 4, 4) for key in keys}, native_sizes={b: 8 for b, _ in keys})
    path = cache_path(root, "toy", split, backbone_id)
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    for shard in range(-(-n // shard_size)):
        rows = slice(shard * shard_size, min(n, (shard + 1) * shard_size))
        write_shard(path, shard, {key: value[rows] for key, value in data.items()}, valid=valid[rows],
                    errors=["" if v else "broken" for v in valid[rows]])
    return open_cache(root, "toy", split, backbone_id), data, labels, valid


def test_load_drops_invalid_rows_and_converts_once(tmp_path):
    cache, data, labels, valid = make_cache(tmp_path)
    loaded = load_features(cache, [(24, 150), (19, 90)])
    assert loaded.num_images == valid.sum() and loaded.dropped == 2 and loaded.class_names == ["a", "b", "c"]
    for key, value in data.items():
        assert loaded.features[key].dtype == torch.float32
        np.testing.assert_array_equal(loaded.features[key].numpy(), value[valid].astype(np.float32))
    np.testing.assert_array_equal(loaded.labels.numpy(), labels[valid])
    assert in_shapes(cache, [(24, 150)], pool=2) == {(24, 150): (3, 2, 2)}
    assert load_features(cache, [(24, 150)], pool=2).features[(24, 150)].shape == (21, 3, 2, 2)


@pytest.mark.parametrize("batch_size", [1, 4, 7, 100])
def test_streamed_batches_equal_the_eager_load(tmp_path, batch_size):
    cache, data, labels, valid = make_cache(tmp_path)
    keys = [(24, 150), (19, 90)]
    batches = list(iter_feature_batches(cache, keys, batch_size))
    assert all(len(labels_) == batch_size for _, labels_ in batches[:-1])
    eager = load_features(cache, keys)
    for key in keys:
        torch.testing.assert_close(torch.cat([f[key] for f, _ in batches]), eager.features[key])
    torch.testing.assert_close(torch.cat([y for _, y in batches]), eager.labels)


def test_resolve_backbone_id(tmp_path):
    make_cache(tmp_path)
    assert resolve_backbone_id(tmp_path, "toy", "train", "32x32_small") == "32x32_small-random0"
    assert resolve_backbone_id(tmp_path, "toy", "train", "32x32_small", "given") == "given"
    with pytest.raises(CacheError, match="no 256x256_uncond cache for toy/train"):
        resolve_backbone_id(tmp_path, "toy", "train", "256x256_uncond")
    make_cache(tmp_path, backbone_id="32x32_small-random1")
    with pytest.raises(CacheError, match="several .* --backbone-id"):
        resolve_backbone_id(tmp_path, "toy", "train", "32x32_small")
