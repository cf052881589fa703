"""Train and test caches of equal class-sorted subsets do not share noise (the leak the split key closes).

Image k of CIFAR-10's train subset and image k of its test subset have the same class when both keep
the first N images of every class; before the split was in the noise key they also had the same noise,
so a random-weight backbone's features matched a test image to its train twin. Each cached row here
is recomputed directly from its image with the noise of (seed, split, id, t) and compared.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract.backbone.registry import create_backbone
from extract.cache import open_cache
from extract.inputs.images import load_batch
from extract.noise import seeded_noise
from extract.pooling import pool_features
from extract.schedule import get_schedule
from pipeline.cli.main import main
from pipeline.datasets import build_index

ARGS = ["extract", "--dataset", "cifar10", "--per-class", "2", "--config", "32x32_small", "--weight-seed", "0",
        "--timesteps", "400", "--blocks", "4", "--pool", "4", "--shard-size", "20", "--batch-size", "20",
        "--threads", "1", "--no-progress", "--synchronous"]


@pytest.mark.e2e
def test_train_and_test_rows_of_one_index_have_independent_noise(cifar10_root, tmp_path):
    root = str(cifar10_root.parent)
    result = CliRunner().invoke(main, [*ARGS, "--split", "train,test", "--data-root", root, "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    model = create_backbone("32x32_small", weight_seed=0)
    rows = {}
    for split in ("train", "test"):
        cache = open_cache(tmp_path, "cifar10", split, "32x32_small-random0")
        assert cache.spec.noise_key == "split+index"
        index = build_index("cifar10", split, root=root, per_class=2)
        cached = cache.load(4, 400).astype(np.float32)
        x0, ok, _ = load_batch([cache.paths[r] for r in range(len(cached))], 32)
        ids = [index.paths.index(p) for p in cache.paths]
        steps = torch.full((len(ids),), 400)
        for key, expected_equal in ((split, True), ("", False)):  # its own split's noise; not the shared legacy noise
            x_t = get_schedule("linear").q_sample(x0, steps, seeded_noise(0, ids, 400, (3, 32, 32), split=key))
            with torch.no_grad():
                direct = pool_features(model.features(x_t, steps, [4])[4], 4).numpy().astype(np.float32)
            assert np.allclose(cached, direct, atol=2e-3, rtol=2e-3) == expected_equal, (split, key)
        rows[split] = dict(zip(ids, cached))
    shared = sorted(set(rows["train"]) & set(rows["test"]))
    assert len(shared) == 20  # ids 0..19 in both, each pair of one class
    every = np.stack([rows[split][i].ravel() for split in ("train", "test") for i in shared])
    mean = every.mean(axis=0)

    def correlation(a, b):
        return np.corrcoef(a.ravel() - mean, b.ravel() - mean)[0, 1]

    twins = np.mean([correlation(rows["train"][i], rows["test"][i]) for i in shared])
    others = np.mean([correlation(rows["train"][i], rows["test"][j]) for i, j in zip(shared, shared[1:] + shared[:1])])
    # at t=400 on random weights the features are mostly noise: shared noise would make twins far closer
    assert abs(twins - others) < 0.15, (twins, others)
