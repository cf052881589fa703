"""The bundled checkpoint: it loads strictly, says how it was made, and its features are not random init's."""

import json
from pathlib import Path

import pytest
import torch

from extract.backbone.checkpoint import compare_state_dict, read_state_dict
from extract.backbone.configs import bundled_checkpoint, get_config
from extract.backbone.registry import create_backbone


def test_bundled_checkpoint_loads_strictly_and_records_its_training():
    path = bundled_checkpoint("32x32_small")
    assert path is not None and Path(path).stat().st_size < 25e6
    state = read_state_dict(path)
    with torch.device("meta"):
        assert compare_state_dict(get_config("32x32_small").build(), state, config_name="32x32_small") is None
    meta = json.loads(Path(path).with_suffix(".json").read_text())
    assert meta["data"] == {"dataset": "cifar10", "split": "train", "images": 50000, "labels_used": False}
    assert meta["steps"] == 1100 and meta["images_seen"] == 1100 * meta["config"]["batch_size"]
    assert meta["weights"] == "ema" and "make pretrain" in meta["command"]
    assert bundled_checkpoint("256x256_uncond") is None


def test_bundled_features_differ_from_both_random_inits():
    trained = create_backbone("32x32_small", checkpoint=bundled_checkpoint("32x32_small"))
    fan_in = create_backbone("32x32_small", weight_seed=0)
    torch.manual_seed(0)
    adm_init = create_backbone("32x32_small")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 25)
    with torch.no_grad():
        ours = trained.features(x, t, [8])[8]
        for other in (fan_in, adm_init):
            theirs = other.features(x, t, [8])[8]
            assert ours.shape == theirs.shape
            assert (ours - theirs).abs().mean() > 0.1 * ours.abs().mean()


@pytest.mark.e2e
def test_bundled_weights_denoise_real_images(cifar10_root):
    """On 16 real CIFAR-10 test images at t=200, the trained model's noise prediction has a small error."""
    from extract.inputs.images import load_batch
    from extract.schedule import get_schedule

    paths = sorted(str(p) for p in (cifar10_root / "test").glob("*/*.jpg"))[::625]
    x0, ok, _ = load_batch(paths, 32)
    assert ok.all() and len(paths) == 16
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    steps = torch.full((len(paths),), 200)
    x_t = get_schedule("linear").q_sample(x0, steps, noise)
    trained = create_backbone("32x32_small", checkpoint=bundled_checkpoint("32x32_small"))
    with torch.no_grad():
        mse = ((trained(x_t, steps)[:, :3] - noise) ** 2).mean().item()
    assert mse < 0.1  # predicting zero scores 1.0; training ended at a loss of about 0.037 averaged over all t
