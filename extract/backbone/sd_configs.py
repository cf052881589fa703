"""Stable Diffusion's named configurations: the diffusers configs of its U-Net, VAE and text encoder, and the empty prompt's tokens.

``sd15`` (SD 1.x: CLIP ViT-L/14 text encoder, 512 px), ``sd21-base`` (SD 2.x at 512 px: OpenCLIP
ViT-H, linear attention projections, head dims per stage) and ``sd21`` (the same U-Net trained at
768 px for v-prediction) share the block layout (b = 1..25). ``sd-tiny`` has the same structure with
tiny widths: the tests and the end-to-end demo build it with random weights. Architecture lives
here; weights come from a user's local folder or file only (``extract.backbone.sd_family``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extract.errors import ConfigError

__all__ = ["SDConfig", "SD_CONFIGS", "get_sd_config", "SCALED_LINEAR"]

#: SD's schedule: betas linear in sqrt from 0.00085 to 0.012, 1000 steps (diffusers' "scaled_linear")
SCALED_LINEAR = "scaled_linear"

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


@dataclass(frozen=True)
class SDConfig:
    """One named SD configuration.

    Args:
        name, description: the registry key and one line for ``diffrep info --list``.
        unet, vae, text: keyword arguments of diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL``
            and transformers' ``CLIPTextConfig``.
        image_size: pixels the U-Net was trained at (its latent is image_size / 8).
        prediction_type: ``epsilon`` or ``v_prediction`` (recorded, not used: features do not read the output).
        null_ids: token ids of the empty prompt (bos, eos, pad): used when no tokenizer is at hand
            (a single-file checkpoint, random weights); a folder's own tokenizer wins.
        table_sizes: image sizes the block table shows (``diffrep info``).
    """

    name: str
    description: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    image_size: int
    prediction_type: str = "epsilon"
    null_ids: tuple[int, int, int] = (49406, 49407, 49407)
    table_sizes: tuple[int, ...] = (512, 256)
    layout_keys: tuple[str, ...] = field(default=("block_out_channels", "layers_per_block", "down_block_types",
                                                  "up_block_types", "cross_attention_dim", "in_channels"))

    @property
    def context_length(self) -> int:
        return int(self.text["max_position_embeddings"])

    @property
    def context_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def flags(self) -> dict[str, Any]:
        """What the cache spec records of the architecture."""
        return {"family": "sd", "cross_attention_dim": self.context_dim,
                "block_out_channels": list(self.unet["block_out_channels"]), "prediction_type": self.prediction_type}


_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
               bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# SD 2.x keeps OpenCLIP ViT-H's first 23 layers (the penultimate output), GELU; its tokenizer pads with "!" (id 0)
_OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=0)

_SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, down_block_types=_DOWN, up_block_types=_UP, cross_attention_dim=768,
                  attention_head_dim=8, norm_num_groups=32)
_SD21_UNET = dict(_SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)

SD_CONFIGS: dict[str, SDConfig] = {
    "sd15": SDConfig("sd15", "Stable Diffusion 1.x (1.4, 1.5): CLIP ViT-L text encoder, 512 px",
                     _SD15_UNET, _SD_VAE, _CLIP_L, 512),
    "sd21-base": SDConfig("sd21-base", "Stable Diffusion 2.x base: OpenCLIP ViT-H text encoder, 512 px, epsilon",
                          _SD21_UNET, _SD_VAE, _OPENCLIP_H, 512, null_ids=(49406, 49407, 0)),
    "sd21": SDConfig("sd21", "Stable Diffusion 2.x: OpenCLIP ViT-H text encoder, 768 px, v-prediction",
                     dict(_SD21_UNET, sample_size=96), dict(_SD_VAE, sample_size=768), _OPENCLIP_H, 768,
                     prediction_type="v_prediction", null_ids=(49406, 49407, 0), table_sizes=(768, 512, 256)),
    "sd-tiny": SDConfig(
        "sd-tiny", "SD's block structure at tiny widths (tests, demo): random weights unless a checkpoint is given",
        dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16, 32), layers_per_block=2,
             down_block_types=_DOWN, up_block_types=_UP, cross_attention_dim=16, attention_head_dim=4,
             norm_num_groups=4),
        dict(_SD_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64),
        dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16, bos_token_id=62,
             eos_token_id=63, pad_token_id=63),
        64, null_ids=(62, 63, 63), table_sizes=(64, 32)),
}


def get_sd_config(name: str) -> SDConfig:
    """The named SD configuration.

    Raises:
        ConfigError: unknown name (the message lists them).
    """
    try:
        return SD_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown configuration {name!r}: choose one of {', '.join(SD_CONFIGS)}") from None
