"""Every named configuration has exactly the official state-dict layout (built on the meta device)."""

import pytest
import torch

from extract.backbone.adm import create_classifier, create_model
from extract.backbone.checkpoint import state_dict_layout
from extract.backbone.configs import NAMED_CONFIGS, get_config
from extract.errors import ConfigError

from .reference import load_manifest

OFFICIAL = [name for name, cfg in NAMED_CONFIGS.items() if cfg.checkpoint_file]


def test_every_official_checkpoint_has_a_named_configuration():
    assert set(OFFICIAL) == {
        "64x64_cond", "128x128_cond", "256x256_cond", "256x256_uncond", "512x512_cond",
        "64x64_classifier", "128x128_classifier", "256x256_classifier", "512x512_classifier",
    }


@pytest.mark.parametrize("name", OFFICIAL)
def test_state_dict_keys_and_shapes_equal_the_manifest(name):
    manifest = load_manifest(name)
    with torch.device("meta"):
        model = get_config(name).build()
    layout = state_dict_layout(model)
    expected = [(key, tuple(shape)) for key, shape in manifest["state_dict"]]
    assert list(layout.items()) == expected  # same keys, same order, same shapes
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"]
    assert get_config(name).checkpoint_file == manifest["checkpoint_file"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_resolved_flags_build_the_same_layout_through_the_public_factories(name):
    """The official flag dictionaries (all flags, diffusion ones included) go straight into our factories."""
    manifest = load_manifest(name)
    with torch.device("meta"):
        if get_config(name).kind == "unet":
            model = create_model(**manifest["resolved_flags"])
        else:
            model = create_classifier(**manifest["resolved_flags"])
    assert [(k, list(v)) for k, v in state_dict_layout(model).items()] == [tuple(x) for x in manifest["state_dict"]]


def test_block_counts():
    with torch.device("meta"):
        assert get_config("256x256_uncond").build().num_blocks == 37
        assert get_config("256x256_classifier").build().num_blocks == 19
        assert get_config("32x32_small").build().num_blocks == 19


def test_unknown_configuration_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown configuration '300x300'.*256x256_uncond"):
        get_config("300x300")


def test_factories_reject_unknown_flags_and_bad_values():
    with pytest.raises(ConfigError, match="unknown flag.*num_chanels"):
        create_model(image_size=64, num_channels=64, num_res_blocks=1, num_chanels=3)
    with pytest.raises(ConfigError, match="channel_mult"):
        create_model(image_size=48, num_channels=64, num_res_blocks=1)
    with pytest.raises(ConfigError, match="attention_resolutions"):
        create_model(image_size=64, num_channels=64, num_res_blocks=1, attention_resolutions="16;8")
    with pytest.raises(ConfigError, match="classifier_pool"):
        create_classifier(image_size=64, classifier_pool="max")


def test_small_classifier_with_overrides():
    model = create_classifier(image_size=32, classifier_width=32, classifier_depth=1, channel_mult="1,2",
                              classifier_attention_resolutions="16", num_head_channels=8)
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert out.shape == (2, 1000)
