"""`features` runs ONE forward that stops after the deepest requested block, and checks its inputs."""

import pytest
import torch

from extract.backbone.configs import get_config
from extract.errors import BlockRangeError


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return get_config("32x32_small").build().eval()


def _record_calls(model):
    """Attach hooks to every block and the output head; returns the list they append to."""
    calls = []
    handles = [model.block_module(b).register_forward_hook(lambda *_, b=b: calls.append(b))
               for b in range(1, model.num_blocks + 1)]
    handles.append(model.out.register_forward_hook(lambda *_: calls.append("out")))
    return calls, handles


@pytest.mark.parametrize("blocks", [[3], [10, 4], [11, 12, 15], [19]])
def test_no_module_after_the_deepest_block_runs(small, blocks):
    calls, handles = _record_calls(small)
    try:
        with torch.no_grad():
            feats = small.features(torch.randn(2, 3, 32, 32), torch.tensor([10, 20]), blocks)
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(1, max(blocks) + 1)), "every block up to the deepest runs once, nothing after"
    assert sorted(feats) == sorted(blocks)


def test_features_equal_the_blocks_of_the_full_forward(small):
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([90, 150])
    captured = {}
    handles = [small.block_module(b).register_forward_hook(lambda m, i, o, b=b: captured.__setitem__(b, o))
               for b in (5, 10, 14)]
    with torch.no_grad():
        small(x, t)
        feats = small.features(x, t, [5, 10, 14])
    for h in handles:
        h.remove()
    for b in (5, 10, 14):
        assert torch.equal(feats[b], captured[b])


def test_shapes_follow_block_shapes(small):
    with torch.no_grad():
        feats = small.features(torch.randn(1, 3, 32, 32), torch.tensor([5]), range(1, 20))
    for b, (channels, size) in small.block_shapes().items():
        assert feats[b].shape == (1, channels, size, size)


@pytest.mark.parametrize("bad", [0, 20, -1])
def test_blocks_out_of_range_name_the_valid_range(small, bad):
    with pytest.raises(BlockRangeError, match=rf"block {bad} is out of range for UNetModel: valid blocks are 1\.\.19"):
        small.features(torch.randn(1, 3, 32, 32), torch.tensor([5]), [1, bad])


def test_mirror_block_is_computed_from_the_configuration(small):
    assert small.mirror_block(11) == 9 and small.mirror_block(19) == 1
    with torch.device("meta"):
        assert get_config("256x256_uncond").build().mirror_block(24) == 14


def test_truncated_walk_keeps_only_the_skips_later_blocks_read():
    """While block 11 of 32x32_small runs (middle = 10) on the way to block 12, only encoder block 8's
    output may still be held: block 12 will read it; block 11 took block 9's; blocks 1..7 are read by nobody."""
    import gc
    import weakref

    from extract.backbone.registry import create_backbone

    model = create_backbone("32x32_small", weight_seed=0)
    outputs = {}
    alive_at_11 = []

    def keep(b):
        def hook(module, args, output):
            outputs[b] = weakref.ref(output)
        return hook

    for b in range(1, 10):
        model.block_module(b).register_forward_hook(keep(b))

    def check(module, args):
        gc.collect()
        alive_at_11.extend(b for b, ref in outputs.items() if ref() is not None)

    model.block_module(11).register_forward_pre_hook(check)
    with torch.no_grad():
        model.features(torch.randn(2, 3, 32, 32), torch.tensor([5, 5]), [12])
    assert alive_at_11 == [8]
