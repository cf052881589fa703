"""Seeded noise is a pure function of (seed, image id, t)."""

import pytest
import torch

from extract.noise import seeded_noise


def test_same_image_same_noise_whatever_the_batch_or_order():
    batch = seeded_noise(0, [5, 9, 2], 150, (3, 8, 8))
    alone = seeded_noise(0, [9], 150, (3, 8, 8))
    reordered = seeded_noise(0, [2, 5, 9], 150, (3, 8, 8))
    assert torch.equal(batch[1], alone[0])
    assert torch.equal(batch[0], reordered[1]) and torch.equal(batch[2], reordered[0])


def test_noise_changes_with_seed_image_and_t():
    base = seeded_noise(0, [1], 150, (3, 8, 8))
    for other in (seeded_noise(1, [1], 150, (3, 8, 8)), seeded_noise(0, [2], 150, (3, 8, 8)), seeded_noise(0, [1], 90, (3, 8, 8))):
        assert not torch.equal(base, other)


def test_noise_is_standard_normal():
    noise = seeded_noise(3, list(range(64)), 300, (3, 16, 16))
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02


def test_per_image_timesteps():
    mixed = seeded_noise(0, [1, 2], [90, 300], (3, 4, 4))
    assert torch.equal(mixed[0], seeded_noise(0, [1], 90, (3, 4, 4))[0])
    assert torch.equal(mixed[1], seeded_noise(0, [2], 300, (3, 4, 4))[0])


# What these numbers guard: every cache ever written holds features of x_t built from this noise. They
# were computed once (torch 2.14) from seeded_noise and are written here literally, so a change in
# torch's CPU generator (or in noise_seed_for's hashing) fails this test instead of silently changing
# every new cache so that it no longer matches the old ones row for row.
PINNED = [  # (seed, image id, t, draw): (element (0,0,0), (1,3,5), (2,7,7)), sum of the (3, 8, 8) draw
    ((0, 0, 150, 0), (-0.70168012, -0.69228196, -0.43295252), 8.02611692),
    ((7, 12345, 25, 0), (-0.58071589, -1.58332098, -0.19371194), -23.08857849),
    ((3, 49999, 999, 2), (-0.66629428, 0.26311880, 1.68472230), 7.87955445),
]


def test_seeded_noise_values_are_pinned():
    for (seed, image_id, t, draw), elements, total in PINNED:
        noise = seeded_noise(seed, [image_id], t, (3, 8, 8), draw=draw)[0]
        got = [float(noise[index]) for index in ((0, 0, 0), (1, 3, 5), (2, 7, 7))]
        assert got == pytest.approx(elements, abs=1e-6), (seed, image_id, t, draw)
        assert float(noise.double().sum()) == pytest.approx(total, abs=1e-6), (seed, image_id, t, draw)


def test_the_split_is_part_of_the_noise_key():
    """Image k of the train split and image k of the test split draw independent noise; the legacy key
    (split "") is the pinned one, which caches written before keep."""
    from extract.cache import CacheSpec
    from extract.cache.spec import NOISE_KEY, noise_split

    train = seeded_noise(0, range(64), 150, (3, 8, 8), split="train")
    test = seeded_noise(0, range(64), 150, (3, 8, 8), split="test")
    legacy = seeded_noise(0, range(64), 150, (3, 8, 8))
    assert not torch.equal(train, test) and not torch.equal(train, legacy)
    correlation = torch.corrcoef(torch.stack([train.flatten(), test.flatten()]))[0, 1]
    assert abs(float(correlation)) < 0.05  # 12,288 values: independent draws, not the same noise
    new = CacheSpec(dataset="d", split="test", backbone_id="b", config_name="c", image_size=8, num_images=1,
                    noise_key=NOISE_KEY)
    old = CacheSpec(dataset="d", split="test", backbone_id="b", config_name="c", image_size=8, num_images=1)
    assert noise_split(new) == "test" and noise_split(old) == ""
