"""Every registered head runs forward and backward; the attention head's parameter counts equal the paper's."""

import pytest
import torch

from extract.backbone.configs import get_config
from probe.errors import ProbeError
import fusion  # noqa: F401 - registers the difformer head, so the registry below is complete
from probe.heads import HEADS, count_parameters, create_head, default_lr

torch.set_num_threads(1)

IN_SHAPES = {(24, 150): (16, 8, 8), (19, 90): (8, 4, 4)}
# DifFormer reads every block at every timestep
GRID_SHAPES = {(b, t): shape for b, shape in ((24, (16, 8, 8)), (19, (8, 4, 4))) for t in (90, 150)}
SMALL = {"attention": dict(dim=32, num_heads=4, depth=1), "difformer": dict(dim=32, num_heads=4, depth=1),
         "mlp": dict(hidden=(16,)), "cnn": dict(channels=(8, 8))}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    shapes = GRID_SHAPES if name == "difformer" else IN_SHAPES
    head = create_head(name, shapes, num_classes=5, **SMALL.get(name, {}))
    x = {key: torch.randn(3, *shape) for key, shape in shapes.items()}
    logits = head(x)
    assert logits.shape == (3, 5)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    params = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"{name}: no (finite) gradient for {no_grad}"
    # The zero-initialised CLS token must still learn (its gradient is non-zero).
    if name == "attention":
        assert head.cls_token.grad.abs().sum() > 0


@pytest.mark.parametrize("depth, classes, millions", [(1, 1000, 15.2), (2, 1000, 27.8), (4, 1000, 53.0), (2, 50, 26.8)])
def test_attention_head_parameter_counts_match_the_paper(depth, classes, millions):
    with torch.device("meta"):
        channels, size = get_config("256x256_uncond").build().block_shapes()[24]
        head = create_head("attention", {(24, 150): (channels, size, size)}, classes, depth=depth)
    assert abs(count_parameters(head) / 1e6 - millions) < 0.1 / 2 + 1e-9


def test_attention_head_defaults_and_cls_is_zero():
    head = create_head("attention", {(24, 150): (8, 4, 4)}, 10, dim=16, num_heads=2)
    assert head.config.depth == 2 and head.config.mlp_ratio == 4.0 and not head.config.qkv_bias
    assert torch.count_nonzero(head.cls_token) == 0
    assert not any("pos" in name for name, _ in head.named_parameters())


def test_linear_probe_pools_to_two_and_has_no_batchnorm():
    head = create_head("linear", {(24, 150): (1024, 16, 16)}, 1000)
    assert count_parameters(head) == 1024 * 4 * 1000 + 1000
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules())
    assert count_parameters(create_head("linear", {(24, 150): (1024, 16, 16)}, 1000, pool=1)) == 1024 * 1000 + 1000


def test_default_learning_rates():
    assert default_lr("linear") == 1e-2 and default_lr("attention") == 5e-2


def test_unknown_head_and_option_are_one_line_errors():
    with pytest.raises(ProbeError, match="unknown head 'resnet': choose one of"):
        create_head("resnet", IN_SHAPES, 10)
    with pytest.raises(ProbeError, match="no option"):
        create_head("attention", IN_SHAPES, 10, width=3)
    with pytest.raises(ProbeError, match="expects"):
        create_head("linear", IN_SHAPES, 10)({(24, 150): torch.zeros(1, 16, 8, 8)})
