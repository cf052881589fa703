"""Seeded noise is a pure function of (seed, image id, t)."""

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
