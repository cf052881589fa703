"""Dense heads: output at the finest map's size, every parameter trained, names and options checked."""

from __future__ import annotations

import pytest
import torch

from probe.dense_heads import create_dense_head
from probe.errors import ProbeError
from probe.heads import count_parameters

SHAPES = {(5, 25): (32, 16, 16), (8, 25): (64, 8, 8), (12, 25): (64, 4, 4)}


@pytest.mark.parametrize("name,shapes,options", [
    ("pixel", {(8, 25): (64, 8, 8)}, {}),
    ("pixel", SHAPES, {"hidden": (16, 8), "ensemble": 3}),
    ("upernet", {(8, 25): (64, 8, 8)}, {"channels": 16}),
    ("upernet", SHAPES, {"channels": 16}),
])
def test_forward_backward_every_parameter(name, shapes, options):
    torch.manual_seed(0)
    head = create_dense_head(name, shapes, 5, **options)
    features = {key: torch.randn(2, *shape, dtype=torch.float16) for key, shape in shapes.items()}
    logits = head(features)
    finest = max(shape[1] for shape in shapes.values())
    assert logits.shape[:2] == (2, 5) and logits.shape[-1] >= finest and torch.isfinite(logits).all()
    loss = sum(out.logsumexp(1).mean() - out[:, 0].mean() for out in head.forward_members(features))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters() if p.requires_grad)
    assert count_parameters(head) == sum(p.numel() for p in head.parameters())


def test_linear_pixel_head_is_one_weight_per_channel_and_class():
    head = create_dense_head("pixel", SHAPES, 11)
    assert count_parameters(head) == (32 + 64 + 64) * 11 + 11


def test_unknown_head_and_no_maps_are_refused():
    with pytest.raises(ProbeError, match="unknown dense head 'fcn'"):
        create_dense_head("fcn", SHAPES, 3)
    with pytest.raises(ProbeError, match="at least one"):
        create_dense_head("pixel", {}, 3)


@pytest.mark.parametrize("options", [{}, {"hidden": (16, 8), "ensemble": 2}])
def test_pixel_head_equals_upsample_concatenate_batchnorm_then_classify(options):
    """The head standardises and classifies each map at its native side; the textbook order must give the same."""
    import copy

    from torch.nn import functional as F

    torch.manual_seed(0)
    head = create_dense_head("pixel", SHAPES, 5, **options)
    members = copy.deepcopy(head.members)
    running_mean, running_var = head.norm.running_mean.clone(), head.norm.running_var.clone()
    features = {key: (3 * torch.randn(4, *shape) + 1).half() for key, shape in SHAPES.items()}

    def textbook(training):
        x = torch.cat([F.interpolate(features[key].float(), size=(16, 16), mode="bilinear", align_corners=False)
                       for key in sorted(SHAPES)], dim=1)
        x = F.batch_norm(x, running_mean, running_var, training=training, momentum=0.1, eps=1e-5)
        return [m(x) for m in members]

    for training in (True, False):
        head.train(training)
        members.train(training)
        ours, theirs = head.forward_members(features), textbook(training)
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape == (4, 5, 16, 16)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(head.norm.running_mean, running_mean)
        torch.testing.assert_close(head.norm.running_var, running_var)
        if training:
            sum(o.square().mean() for o in ours).backward()
            sum(o.square().mean() for o in theirs).backward()
            for p, q in zip(head.members.parameters(), members.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
