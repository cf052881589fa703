"""The backbone-family interface: ADM satisfies it, the registry routes create_backbone, a new family is one entry."""

import pytest
import torch
from torch import nn

from extract.backbone import registry
from extract.backbone.adm_family import ADMFamily
from extract.backbone.family import BackboneFamily, BlockwiseBackbone
from extract.backbone.identity import backbone_id
from extract.backbone.registry import create_backbone, family_of, get_family
from extract.errors import BlockRangeError, ConfigError
from extract.schedule import get_schedule


@pytest.mark.parametrize("name", ["32x32_small", "256x256_uncond", "64x64_classifier"])
def test_adm_modules_satisfy_the_interface(name):
    family = family_of(name)
    assert isinstance(family, ADMFamily) and family.name == "adm" and family.inputs == "pixels"
    assert isinstance(family.build_meta(name), BlockwiseBackbone)


def test_the_family_answers_from_the_configuration():
    adm = get_family("adm")
    assert adm.mirror_block("256x256_uncond", 24) == 14 and adm.mirror_block("256x256_uncond", 37) == 1
    assert adm.mirror_block("32x32_small", 11) == 9
    assert adm.normalize_blocks("32x32_small", [12, 3, 12]) == ((3, 12), 12)
    with pytest.raises(BlockRangeError, match=r"^block 40 is out of range for 32x32_small: valid blocks are 1\.\.19$"):
        adm.normalize_blocks("32x32_small", [3, 40])
    with pytest.raises(BlockRangeError, match=r"^block 10 of 32x32_small has no mirror: decoder blocks are 11\.\.19$"):
        adm.mirror_block("32x32_small", 10)
    with pytest.raises(BlockRangeError, match="has no mirror"):  # a classifier is all encoder
        adm.mirror_block("64x64_classifier", 5)
    cosine, linear = adm.schedule("64x64_cond"), adm.schedule("32x32_small")
    assert (cosine.betas == get_schedule("cosine", 1000).betas).all()
    assert (linear.betas == get_schedule("linear", 1000).betas).all()
    assert adm.input_size("64x64_cond") == 64
    assert adm.backbone_id("32x32_small", weight_seed=4) == backbone_id("32x32_small", weight_seed=4) == "32x32_small-random4"


def test_block_table_rows_match_the_features_one_forward_gives():
    """Channels, side and stride of every row equal those of the features the module returns."""
    rows = family_of("32x32_small").block_table("32x32_small")
    model = create_backbone("32x32_small", weight_seed=0)
    with torch.no_grad():
        feats = model.features(torch.randn(1, 3, 32, 32), torch.tensor([5]), range(1, model.num_blocks + 1))
    assert [r.b for r in rows[:-1]] == list(range(1, 20)) and rows[-1].module == "total"
    for row in rows[:-1]:
        _, channels, side, _ = feats[row.b].shape
        assert (row.channels, row.size, row.stride) == (channels, side, 32 // side), row
        assert row.module == model.block_module_name(row.b)
    assert [r.flops_cum for r in rows[:-1]] == sorted(r.flops_cum for r in rows[:-1]) and rows[-1].flops_cum > rows[-2].flops_cum
    assert rows[-1].params == sum(p.numel() for p in model.parameters())


class _Tiny(nn.Module):
    """Three blocks: enough to stand for another family's module."""

    num_blocks = 3

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 1) for _ in range(3)])

    def features(self, x_t, timesteps, blocks, inject=None, cond=None):
        out = {}
        for b, block in enumerate(self.blocks, start=1):
            x_t = block(x_t)
            out[b] = x_t
        return {b: out[b] for b in blocks}

    def forward(self, x, t):
        return self.features(x, t, [3])[3]

    def block_shapes(self):
        return {b: (4, 8) for b in (1, 2, 3)}

    def block_module_name(self, b):
        return f"blocks.{b - 1}"

    def block_module(self, b):
        return self.blocks[b - 1]


class _LatentFamily(BackboneFamily):
    name = "latent-toy"
    inputs = "latent"

    def config_names(self):
        return ("toy_latent",)

    def input_size(self, config_name):
        return 8

    def schedule(self, config_name):
        return get_schedule("linear", 1000)

    def create(self, config_name, checkpoint=None, weight_seed=None, **overrides):
        return _Tiny().eval()

    def build_meta(self, config_name):
        with torch.device("meta"):
            return _Tiny()

    def example_inputs(self, config_name, model, batch):
        return torch.empty(batch, 4, 8, 8, device="meta"), torch.zeros(batch, device="meta")


def test_a_second_family_is_one_registry_entry(monkeypatch):
    monkeypatch.setitem(registry.FAMILIES, "latent-toy", _LatentFamily)
    assert isinstance(create_backbone("toy_latent"), _Tiny)
    assert family_of("toy_latent").inputs == "latent" and isinstance(family_of("32x32_small"), ADMFamily)
    rows = family_of("toy_latent").block_table("toy_latent")
    assert [(r.b, r.module, r.stride) for r in rows[:-1]] == [(1, "blocks.0", 1), (2, "blocks.1", 1), (3, "blocks.2", 1)]
    assert rows[0].flops_cum == 2 * 4 * 4 * 64 and rows[-1].flops_cum == 3 * rows[0].flops_cum  # 1x1 convs, 8x8
    with pytest.raises(ConfigError, match=r"^unknown configuration 'nope': choose one of .*256x256_uncond.*toy_latent$"):
        create_backbone("nope")
    with pytest.raises(ConfigError, match=r"^unknown backbone family 'dit': choose one of adm, sd, latent-toy$"):
        get_family("dit")
