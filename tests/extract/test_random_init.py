"""Random weights for checkpoint-free runs: deterministic, and every block does real work."""

import torch

from extract.backbone.configs import get_config
from extract.backbone.registry import create_backbone


def test_weights_are_a_pure_function_of_the_seed():
    torch.manual_seed(123)
    a = create_backbone("32x32_small", weight_seed=4)
    torch.manual_seed(999)
    b = create_backbone("32x32_small", weight_seed=4)
    c = create_backbone("32x32_small", weight_seed=5)
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, r), name


def test_residual_branches_are_not_identities():
    """ADM's own init zeroes residual outputs, so its middle block returns its input; ours must not."""
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 150])
    adm_init = get_config("32x32_small").build().eval()
    ours = create_backbone("32x32_small", weight_seed=0)
    with torch.no_grad():
        f_adm = adm_init.features(x, t, [9, 10])
        f_ours = ours.features(x, t, [9, 10])
    assert torch.equal(f_adm[9], f_adm[10])
    change = (f_ours[10] - f_ours[9]).norm() / f_ours[9].norm()
    assert change > 0.1
    assert torch.isfinite(f_ours[10]).all()
