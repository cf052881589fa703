"""Dense training: streamed batches, a checkpoint each epoch, resume equal to a straight run, scoring at label size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.dense_heads import create_dense_head
from probe.dense_train import DenseSource, fit_dense, score_dense
from probe.errors import ProbeError
from probe.train import TrainConfig


def _source(n=24, seed=0):
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((n, 4, 8, 8)).astype(np.float16)
    labels = np.repeat(np.repeat(maps[:, :3].argmax(1), 2, axis=1), 2, axis=2).astype(np.uint8)  # (n, 16, 16)
    labels[:, :2] = 255  # an ignored strip
    source = DenseSource(readers={(8, 25): lambda s, e: maps[s:e]}, num_rows=n, labels=lambda s, e: labels[s:e],
                         valid=np.ones(n, dtype=bool))
    return source, labels


def _head():
    torch.manual_seed(0)
    return create_dense_head("pixel", {(8, 25): (4, 8, 8)}, 3)


def test_a_checkpoint_each_epoch_and_resume_refuses_other_features(tmp_path):
    source, _ = _source()
    config = TrainConfig(epochs=2, lr=0.05, optimizer="adam", batch_size=5, seed=1)
    fit_dense(_head(), source, config, checkpoint_dir=tmp_path, identity={"blocks": [8]}, progress=False)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1
    with pytest.raises(ProbeError, match="other features or head"):
        fit_dense(_head(), source, config, checkpoint_dir=tmp_path, resume=True, identity={"blocks": [5]}, progress=False)


def test_resume_continues_from_the_saved_epoch(tmp_path):
    source, _ = _source()
    config = TrainConfig(epochs=3, lr=0.05, optimizer="adam", batch_size=5, seed=1)
    straight = _head()
    fit_dense(straight, source, config, progress=False)
    first = _head()
    fit_dense(first, source, TrainConfig(**{**config.__dict__, "epochs": 2}), checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    state["config"]["epochs"] = 3  # the same run, asked for one more epoch
    torch.save(state, tmp_path / "checkpoint.pth")
    resumed = _head()
    fit_dense(resumed, source, config, checkpoint_dir=tmp_path, resume=True, progress=False)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_learnable_map_is_learned_and_scored_at_label_size():
    source, labels = _source(n=32)
    head = _head()
    fit = fit_dense(head, source, TrainConfig(epochs=6, lr=0.05, optimizer="adam", batch_size=8, seed=0), progress=False)
    assert fit.pixels_per_second > 0 and fit.history[-1]["loss"] < fit.history[0]["loss"]
    full = [np.kron(labels[r], np.ones((2, 2), dtype=np.uint8)) for r in range(32)]  # labels at twice the input side
    scores, kept = score_dense(head, source, 3, lambda r: (full[r], (0, 0, 32, 32)), keep=2)
    assert scores.pixels == 32 * 28 * 32 and scores.miou > 0.5 and set(kept) == {0, 1} and kept[0].shape == (32, 32)


def test_a_linear_head_trained_in_chunks_of_one_image_equals_whole_batches():
    """Under a small working set the batch runs an image at a time with the whole batch's gradient."""
    from probe.dense_train import images_per_chunk

    source, _ = _source()
    config = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", batch_size=6, seed=1)
    whole, chunked = _head(), _head()
    assert images_per_chunk(chunked, 6, 16, working_bytes=1) == 1
    fit_dense(whole, source, config, progress=False)
    fit_dense(chunked, source, config, progress=False, working_bytes=1)
    for (name, a), b in zip(whole.state_dict().items(), chunked.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    mlp = create_dense_head("pixel", {(8, 25): (4, 8, 8)}, 3, hidden=(8,))
    assert images_per_chunk(mlp, 6, 16, working_bytes=1) == 6  # its hidden BatchNorm couples the batch: never chunked
    assert images_per_chunk(mlp.eval(), 6, 16, working_bytes=1, training=False) == 1  # scoring is per image
