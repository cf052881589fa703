"""Cached arrays come back as float16 tensors (as stored), invalid rows dropped, eager and streamed alike."""

import numpy as np
import pytest
import torch

from extract.cache import CacheSpec, cache_path, create_cache, open_cache
from extract.errors import CacheError
import probe.train as train_module
from extract.cache.spec import NOISE_KEY
from probe.features import (
    StreamedFeatures, choose_read_pool, flatten_features, in_shapes, iter_feature_batches, load_at_pools, load_features,
    resolve_backbone_id,
)
from probe.heads import create_head
from probe.train import TrainConfig, evaluate, fit, tensor_batches
from tests.extract.shard_writes import write_and_mark


def make_cache(root, n=23, shard_size=5, keys=((24, 150), (19, 90)), invalid=(3, 17), backbone_id="32x32_small-random0",
               split="train", signal=0.0, seed=0, dataset="toy", class_names=("a", "b", "c"), **spec_fields):
    """A real cache on disk: random float16 features (plus ``signal`` on channel = label), a few rows invalid."""
    spec_fields.setdefault("noise_key", NOISE_KEY)  # as every cache extract writes now
    spec = CacheSpec(dataset=dataset, split=split, backbone_id=backbone_id, config_name="32x32_small",
                     image_size=32, num_images=n, shard_size=shard_size, pool=4, **spec_fields)
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    data = {}
    for key in keys:
        values = rng.normal(size=(n, 3, 4, 4))
        values[np.arange(n), labels] += signal
        data[key] = values.astype(np.float16)
    create_cache(root, spec, [f"img/{i}.jpg" for i in range(n)], labels, list(class_names),
                 arrays={key: (3, 4, 4) for key in keys}, native_sizes={b: 8 for b, _ in keys})
    path = cache_path(root, dataset, split, backbone_id)
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    for shard in range(-(-n // shard_size)):
        rows = slice(shard * shard_size, min(n, (shard + 1) * shard_size))
        write_and_mark(path, shard, {key: value[rows] for key, value in data.items()},
                       invalid={row: "broken" for row in range(rows.start, rows.stop) if not valid[row]})
    return open_cache(root, dataset, split, backbone_id), data, labels, valid


def test_keys_read_at_their_own_pools_then_flattened_as_the_linear_probe_reads_them(tmp_path):
    cache, data, labels, valid = make_cache(tmp_path)
    keys = [(24, 150), (19, 90)]
    assert [choose_read_pool(cache, key, pool) for key, pool in zip(keys, (2, 4))] == [2, None]  # never finer than stored
    assert choose_read_pool(cache, keys[0], None) is None
    loaded = load_at_pools(cache, keys, {keys[0]: 2, keys[1]: None})
    assert loaded.features[keys[0]].shape == (21, 3, 2, 2) and loaded.features[keys[1]].shape == (21, 3, 4, 4)
    stored = {key: torch.from_numpy(data[key][valid]) for key in keys}
    flat = flatten_features(stored, keys, 2, chunk_rows=4)  # chunks of 4 rows: the same as one pass
    by_hand = [value.float().reshape(21, 3, 2, 2, 2, 2).mean(dim=(3, 5)).half().flatten(1)
               for value in (stored[key] for key in keys)]  # 2x2 windows averaged in float32
    assert flat.dtype == torch.float16 and flat.shape == (21, 2 * 3 * 2 * 2)
    torch.testing.assert_close(flat, torch.cat(by_hand, dim=1), rtol=0, atol=0)
    torch.testing.assert_close(flatten_features(stored, keys[:1], None), stored[keys[0]].flatten(1), rtol=0, atol=0)


def test_load_drops_invalid_rows_and_keeps_float16(tmp_path):
    cache, data, labels, valid = make_cache(tmp_path)
    loaded = load_features(cache, [(24, 150), (19, 90)])
    assert loaded.num_images == valid.sum() and loaded.dropped == 2 and loaded.class_names == ["a", "b", "c"]
    for key, value in data.items():
        assert loaded.features[key].dtype == torch.float16  # as stored: half the RAM of float32
        np.testing.assert_array_equal(loaded.features[key].numpy(), value[valid])
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


def test_streamed_epochs_cover_every_valid_row_once_in_a_seeded_order(tmp_path):
    cache, data, labels, valid = make_cache(tmp_path, n=41)
    stream = StreamedFeatures(cache, [(24, 150)], window_bytes=3 * 5 * 96)  # three 5-row shards of 96-byte rows
    eager = load_features(cache, [(24, 150)])

    def rows(seed, epoch):
        batches = list(stream.batches(5, seed=seed, epoch=epoch))
        assert all(len(y) == 5 for _, y in batches[:-1])
        return torch.cat([f[(24, 150)] for f, _ in batches]), torch.cat([y for _, y in batches])

    x0, y0 = rows(0, 0)
    x1, _ = rows(0, 1)
    assert stream.num_images == eager.num_images == len(y0)
    assert torch.equal(x0, rows(0, 0)[0]) and not torch.equal(x0, x1)
    key = lambda x: x.flatten(1)[:, 0]  # noqa: E731 - rows are distinct random draws
    assert torch.equal(x0[key(x0).argsort()], eager.features[(24, 150)][key(eager.features[(24, 150)]).argsort()])
    x_ordered, y_ordered = rows(None, 0)
    assert torch.equal(x_ordered, eager.features[(24, 150)]) and torch.equal(y_ordered, eager.labels)


def test_fit_on_streamed_splits_learns_and_resumes_bit_exact(tmp_path, monkeypatch):
    train_cache, *_ = make_cache(tmp_path, n=60, split="train", signal=4.0)
    test_cache, *_ = make_cache(tmp_path, n=30, split="test", signal=4.0, seed=1)
    keys = [(24, 150)]
    train, test = StreamedFeatures(train_cache, keys, window_bytes=2 * 5 * 96), StreamedFeatures(test_cache, keys)
    config = TrainConfig(epochs=4, lr=0.2, batch_size=8, step_size=2)

    def head():
        torch.manual_seed(0)
        return create_head("linear", in_shapes(train_cache, keys), 3)

    straight = head()
    result = fit(straight, train, None, test, None, config, progress=False)
    eager = load_features(test_cache, keys)
    assert result.top1 > 0.9
    assert result.top1 == evaluate(straight, tensor_batches(eager.features, eager.labels, torch.arange(eager.num_images), 7))["top1"]

    real, calls = train_module.train_one_epoch, []

    def dies_in_epoch_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", dies_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        fit(head(), train, None, test, None, config, progress=False, checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    resumed = create_head("linear", in_shapes(train_cache, keys), 3)
    fit(resumed, train, None, test, None, config, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_split_that_fits_one_window_streams_the_in_ram_epochs_exactly(tmp_path):
    """Streaming is then only a memory choice: same batches, same trained weights as the features in RAM."""
    train_cache, *_ = make_cache(tmp_path, n=60, split="train", signal=1.0)
    test_cache, *_ = make_cache(tmp_path, n=30, split="test", signal=1.0, seed=1)
    keys = [(24, 150), (19, 90)]
    stream = StreamedFeatures(train_cache, keys)  # the default share of the RAM cap holds these 58 rows
    assert len(stream.windows(0, 0)) == 1
    eager, test = load_features(train_cache, keys), load_features(test_cache, keys)
    config = TrainConfig(epochs=3, lr=0.3, batch_size=8, step_size=2, seed=5)
    heads = []
    for train, labels in ((eager.features, eager.labels), (stream, None)):
        torch.manual_seed(0)
        heads.append(create_head("linear", in_shapes(train_cache, keys), 3))
        fit(heads[-1], train, labels, test.features, test.labels, config, progress=False)
    for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values()):
        assert torch.equal(a, b)
    small = StreamedFeatures(train_cache, keys, window_bytes=20 * 2 * 96)  # several windows: mixed, not equal
    assert len(small.windows(0, 0)) > 1
    assert sorted(torch.cat([y for _, y in small.batches(8, seed=5)]).tolist()) == sorted(eager.labels.tolist())
