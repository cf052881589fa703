"""The one noisy forward against q_sample, the backbone's features and adaptive pooling computed by hand."""

import pytest
import torch
from torch.nn import functional as F

from extract.backbone.registry import create_backbone
from extract.errors import TimestepRangeError
from extract.forward import block_features, diffuse, noisy_input
from extract.noise import seeded_noise
from extract.schedule import get_schedule

from .reference import equal_to_float16_rounding

torch.set_num_threads(1)
IDS = [7, 3, 120, 45, 9, 2, 88, 61]


@pytest.fixture(scope="module")
def model():
    return create_backbone("32x32_small", weight_seed=4)


@pytest.fixture(scope="module")
def x0():
    return torch.rand((len(IDS), 3, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_noisy_input_is_q_sample_of_the_seeded_noise(x0, schedule_name):
    schedule = get_schedule(schedule_name)
    for seed, t, draw in ((0, 90, 0), (5, 999, 0), (0, 0, 2)):
        noise = seeded_noise(seed, IDS, t, (3, 32, 32), draw=draw)
        by_hand = (schedule.sqrt_alphas_cumprod[t] * x0.double()
                   + schedule.sqrt_one_minus_alphas_cumprod[t] * noise.double())
        got = noisy_input(x0, t, IDS, seed, schedule, draw=draw)
        assert got.dtype == torch.float32
        assert torch.equal(got, schedule.q_sample(x0, torch.full((len(IDS),), t), noise)), (seed, t, draw)
        assert torch.allclose(got.double(), by_hand, atol=1e-6), (seed, t, draw)
    assert not torch.equal(noisy_input(x0, 90, IDS, 0, schedule), noisy_input(x0, 90, IDS, 0, schedule, draw=1))


def test_diffuse_uses_the_noise_given_and_checks_t(x0):
    schedule = get_schedule("linear")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(diffuse(x0, 300, noise, schedule), schedule.q_sample(x0, torch.full((len(IDS),), 300), noise))
    with pytest.raises(TimestepRangeError, match=r"0\.\.999"):
        diffuse(x0, 1000, noise, schedule)


def test_block_features_are_the_backbones_features_pooled_by_hand(model, x0):
    x_t = noisy_input(x0, 150, IDS, 0, get_schedule("linear"))
    steps = torch.full((len(IDS),), 150)
    with torch.no_grad():
        maps = model.features(x_t, steps, [4, 10, 15])
        pooled = block_features(model, x_t, 150, [15, 4, 10], pool=4)
        full = block_features(model, x_t, 150, [4, 10], pool=0)
        raw = block_features(model, x_t, steps, [10])
        tuned = block_features(model, x_t, 150, [15], pool=4, float16=False)
    assert set(pooled) == {4, 10, 15} and set(raw) == {10}
    for b in (4, 10, 15):
        assert pooled[b].dtype == torch.float16 and pooled[b].shape[-1] == min(4, maps[b].shape[-1])
        assert torch.equal(pooled[b], F.adaptive_avg_pool2d(maps[b].float(), 4).half()), b
    for b in (4, 10):
        assert torch.equal(full[b], maps[b].half()), "pool 0 keeps the full map"
    assert torch.equal(raw[10], maps[10]), "pool None: the maps as computed"
    assert tuned[15].dtype == torch.float32 and torch.equal(tuned[15], F.adaptive_avg_pool2d(maps[15], 4))


def test_block_features_pass_inject_to_the_walk(model, x0):
    x_t = noisy_input(x0, 25, IDS, 0, get_schedule("linear"))
    channels, size = model.block_shapes()[3]
    inject = {3: torch.randn((len(IDS), channels, size, size), generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        plain = block_features(model, x_t, 25, [12], pool=4)[12]
        fed = block_features(model, x_t, 25, [12], pool=4, inject=inject)[12]
        by_hand = F.adaptive_avg_pool2d(model.features(x_t, torch.full((len(IDS),), 25), [12], inject=inject)[12], 4)
    assert torch.equal(fed, by_hand.half()) and not torch.equal(fed, plain)


def test_the_same_images_whatever_the_batch_split(model, x0):
    """x_t is the same bits whatever the split (the noise is per image); the pooled float16 features
    agree to float16 rounding (CPU kernels change float32 bits with the batch size, which is why the
    job cuts a shard's batches the same way every time)."""
    schedule = get_schedule("linear")
    splits = ((0, 3), (3, 4), (4, 8))
    whole = noisy_input(x0, 90, IDS, 0, schedule)
    parts = torch.cat([noisy_input(x0[lo:hi], 90, IDS[lo:hi], 0, schedule) for lo, hi in splits])
    assert torch.equal(whole, parts)
    with torch.inference_mode():
        together = block_features(model, whole, 90, [6, 12], pool=4)
        apart = [block_features(model, whole[lo:hi], 90, [6, 12], pool=4) for lo, hi in splits]
    for b in (6, 12):
        assert equal_to_float16_rounding(together[b], torch.cat([part[b] for part in apart])), b
