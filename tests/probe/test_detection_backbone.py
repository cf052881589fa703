"""The detection backbone adapter: its maps are the backbone's own block outputs for the same x_t, as a pyramid."""

from __future__ import annotations

import math

import pytest
import torch

from extract.backbone.registry import create_backbone
from extract.noise import seeded_noise
from extract.schedule import get_schedule
from probe.detection import (DetectorConfig, DiffusionPyramid, PyramidBackbone, create_detector, pyramid_blocks,
                             pyramid_strides)
from probe.detection.model import anchor_sizes, frozen_prefixes
from probe.errors import ProbeError

CONFIG = "32x32_small"


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(CONFIG, weight_seed=0)


def _hooked_blocks(model, x_t, t, blocks):
    """Block outputs captured by forward hooks during the model's full, official forward (not ``features``)."""
    captured, handles = {}, []
    for b in blocks:
        handles.append(model.block_module(b).register_forward_hook(
            lambda _m, _i, out, b=b: captured.__setitem__(b, out.detach().clone())))
    try:
        with torch.no_grad():
            model(x_t, torch.full((x_t.shape[0],), t, dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_adapter_maps_equal_the_backbones_own_block_outputs_for_the_same_x_t(backbone):
    schedule = get_schedule("linear", 1000)
    t, ids, seed = 25, [3, 17], 5
    with pytest.raises(ProbeError, match="blocks 8 and 12 of 32x32_small have the same stride 4"):
        pyramid_strides(CONFIG, (8, 12, 15))
    blocks = (7, 15)  # an encoder block (stride 4) and a decoder block (stride 2)
    strides = pyramid_strides(CONFIG, blocks)
    assert strides == {7: 4, 15: 2}
    adapter = DiffusionPyramid(backbone, strides, t, schedule, noise_seed=seed)
    x0 = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad(), adapter.seeded_ids(ids):
        maps = adapter(x0)
    # x_t by the closed form, from the schedule's alpha-bar and the seeded noise of each image id
    abar = float(schedule.alphas_cumprod[t])
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * seeded_noise(seed, ids, t, (3, 64, 64))
    expected = _hooked_blocks(backbone, x_t, t, blocks)
    assert list(maps) == ["b15", "b7"]  # finest stride first
    for b in blocks:
        assert maps[f"b{b}"].shape == (2, backbone.block_shapes()[b][0], 64 // strides[b], 64 // strides[b])
        torch.testing.assert_close(maps[f"b{b}"], expected[b], rtol=1e-5, atol=1e-5)


def test_training_noise_is_fresh_and_the_frozen_backbone_gets_no_gradient(backbone):
    adapter = DiffusionPyramid(backbone, pyramid_strides(CONFIG, (12, 15)), 25, get_schedule("linear", 1000))
    pyramid = PyramidBackbone(adapter, adapter.channels, ["b15", "b12"], out_channels=16)
    x0 = torch.zeros(1, 3, 32, 32)
    first, second = adapter(x0)["b15"], adapter(x0)["b15"]
    assert not torch.equal(first, second)  # new noise each call outside seeded_ids
    out = pyramid(x0)
    assert list(out) == ["b15", "b12", "pool"] and out["b15"].shape == (1, 16, 16, 16)
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None for p in pyramid.fpn.parameters())
    detector = create_detector(pyramid, 3, DetectorConfig(image_size=32, fpn_channels=16))
    assert frozen_prefixes(detector) == ["backbone.body."]  # the adapter holds only the frozen backbone


def test_finetune_trains_the_backbone():
    model = create_backbone(CONFIG, weight_seed=1)
    adapter = DiffusionPyramid(model, pyramid_strides(CONFIG, (12,)), 25, get_schedule("linear", 1000), finetune=True)
    adapter.train()
    assert model.training
    adapter(torch.zeros(1, 3, 32, 32))["b12"].sum().backward()
    assert all(p.grad is not None for p in model.input_blocks.parameters())


def test_default_pyramid_and_anchors():
    assert pyramid_blocks(CONFIG) == (12, 15)
    assert pyramid_strides(CONFIG, (12, 15)) == {12: 4, 15: 2}
    assert anchor_sizes(3, 32) == ((4,), (11,), (32,))
    with pytest.raises(ProbeError, match="block 40 is out of range"):
        pyramid_strides(CONFIG, (40,))
