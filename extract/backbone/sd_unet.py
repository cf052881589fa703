"""Stable Diffusion's U-Net as a blockwise backbone: diffusers' modules walked block by block in the paper's numbering.

SD's U-Net in its original code has ADM's layout (12 input blocks, a middle block, 12 output
blocks), so it is numbered as the paper numbers ADM: b = 1 is ``conv_in``; then, for each down
block, one b per (resnet [+ attention]) pair and one for its downsampler; the middle block; then,
for each up block, one b per (resnet [+ attention]) pair, the last pair's b being the output of
the block's upsampler when it has one (as ADM's output block ends with its upsample). For SD 1.x
and 2.x that is b = 1..12 encoder, 13 middle, 14..25 decoder. The walk below calls diffusers'
own submodules in the order ``UNet2DConditionModel.forward`` does, so block b's map is exactly
what that module returns inside diffusers' full forward, and it stops after the deepest block.

The module also holds the VAE encoder (image -> latent: the posterior mean times the VAE's
scaling factor; no sample is drawn, so a latent is a pure function of the image) and the null-text
conditioning (the empty prompt through the checkpoint's own text encoder, computed once when the
backbone is built and kept as a buffer; the text encoder itself is not kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from extract.backbone.family import normalize_blocks

__all__ = ["SDBlock", "SDUNetBackbone", "sd_blocks", "LATENT_CHOICE"]

#: how an image becomes the U-Net's x0 (recorded in the cache spec)
LATENT_CHOICE = "vae-posterior-mean"


@dataclass(frozen=True)
class SDBlock:
    """Block b of a diffusers U-Net: which stage it is in and which of its modules produce it.

    ``kind``: ``conv_in``, ``down`` (resnet [+ attention] of down block ``stage``, layer ``layer``),
    ``downsample``, ``mid``, ``up`` (resnet [+ attention], and the upsampler when ``upsample``).
    ``module``: the diffusers name of the module whose output is block b.
    """

    b: int
    kind: str
    stage: int
    layer: int
    module: str
    upsample: bool = False


def sd_blocks(unet: nn.Module) -> list[SDBlock]:
    """The paper's block sequence of a diffusers ``UNet2DConditionModel`` (shape-only modules are fine)."""
    blocks: list[SDBlock] = [SDBlock(1, "conv_in", -1, -1, "conv_in")]
    for i, down in enumerate(unet.down_blocks):
        has_attention = getattr(down, "attentions", None) is not None and len(down.attentions) > 0
        for j in range(len(down.resnets)):
            name = f"down_blocks.{i}.{'attentions' if has_attention else 'resnets'}.{j}"
            blocks.append(SDBlock(len(blocks) + 1, "down", i, j, name))
        if down.downsamplers is not None:
            blocks.append(SDBlock(len(blocks) + 1, "downsample", i, 0, f"down_blocks.{i}.downsamplers.0"))
    blocks.append(SDBlock(len(blocks) + 1, "mid", -1, -1, "mid_block"))
    for i, up in enumerate(unet.up_blocks):
        has_attention = getattr(up, "attentions", None) is not None and len(up.attentions) > 0
        last = len(up.resnets) - 1
        for j in range(len(up.resnets)):
            upsample = j == last and up.upsamplers is not None
            name = (f"up_blocks.{i}.upsamplers.0" if upsample
                    else f"up_blocks.{i}.{'attentions' if has_attention else 'resnets'}.{j}")
            blocks.append(SDBlock(len(blocks) + 1, "up", i, j, name, upsample))
    return blocks


class SDUNetBackbone(nn.Module):
    """A diffusers SD U-Net (plus the VAE encoder and the null-text embedding) behind ``features``.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        vae: a diffusers ``AutoencoderKL`` (only its encoder is used), or None (latents given directly).
        null_text: (1, L, D) the text encoder's output for the empty prompt.
        scaling_factor: the VAE's latent scaling (0.18215 for SD 1.x and 2.x).
        name: the configuration's name (error messages).
        downsampling: pixels per latent cell when there is no VAE to say it (8 for SD).
    """

    def __init__(self, unet: nn.Module, vae: nn.Module | None, null_text: torch.Tensor, scaling_factor: float,
                 name: str = "sd", downsampling: int = 8):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.register_buffer("null_text", null_text, persistent=False)
        self.scaling_factor = float(scaling_factor)
        self.config_name = name
        self.blocks = sd_blocks(unet)
        self.latent_channels = int(unet.config.in_channels)
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else int(downsampling)
        #: the image side ``block_shapes()`` answers for (None: the U-Net's native size); ``--image-size`` sets it
        self.image_size: int | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_module_name(self, b: int) -> str:
        return self.blocks[b - 1].module

    def block_module(self, b: int) -> nn.Module:
        return self.unet.get_submodule(self.blocks[b - 1].module)

    def block_strides(self) -> dict[int, int]:
        """``{b: stride}`` of each block's map relative to the latent."""
        stride, strides = 1, {}
        for block in self.blocks:
            if block.kind == "downsample":
                stride *= 2
            strides[block.b] = stride
            if block.upsample:
                stride //= 2
                strides[block.b] = stride
        return strides

    def block_channels(self) -> dict[int, int]:
        """``{b: channels}`` of each block's output."""
        unet, out = self.unet, {}
        for block in self.blocks:
            if block.kind == "conv_in":
                out[block.b] = unet.conv_in.out_channels
            elif block.kind in ("down", "downsample"):
                out[block.b] = unet.down_blocks[block.stage].resnets[-1].out_channels
            elif block.kind == "mid":
                out[block.b] = unet.mid_block.resnets[-1].out_channels
            else:
                out[block.b] = unet.up_blocks[block.stage].resnets[block.layer].out_channels
        return out

    def block_shapes(self, image_size: int | None = None) -> dict[int, tuple[int, int]]:
        """``{b: (channels, side)}`` for square images of ``image_size`` pixels (default: the U-Net's native size)."""
        image_size = image_size or self.image_size
        latent = (image_size // self.downsampling) if image_size else int(self.unet.config.sample_size)
        strides, channels = self.block_strides(), self.block_channels()
        return {b: (channels[b], max(1, latent // strides[b])) for b in channels}

    def input_shape(self, image_size: int) -> tuple[int, int, int]:
        """Shape of x0 (and of the noise) for one image of ``image_size`` pixels: the latent (C, S/8, S/8)."""
        return (self.latent_channels, image_size // self.downsampling, image_size // self.downsampling)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (N, 3, S, S) -> latents (N, 4, S/8, S/8): the posterior mean times the scaling factor."""
        if self.vae is None:
            raise RuntimeError(f"{self.config_name} was built without its VAE: pass latents, not images")
        moments = self.vae.quant_conv(self.vae.encoder(pixels)) if self.vae.quant_conv is not None \
            else self.vae.encoder(pixels)
        mean = torch.chunk(moments, 2, dim=1)[0]
        return mean * self.scaling_factor

    def conditioning(self, batch: int, cond: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The text conditioning of a batch: ``cond`` ((1 or N, L, D), e.g. a learnable embedding), or the null text."""
        context = self.null_text if cond is None else cond
        if context.shape[0] == 1 and batch != 1:
            context = context.expand(batch, *context.shape[1:])
        return context if dtype is None else context.to(dtype)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The full forward: the predicted noise (or v) of the U-Net, (N, 4, h, w)."""
        return self._walk(x_t, timesteps, self.num_blocks, cond=cond, head=True)[1]

    def features(self, x_t: torch.Tensor, timesteps: torch.Tensor, blocks: int | Iterable[int],
                 inject: Mapping[int, torch.Tensor] | None = None, cond: Any = None) -> dict[int, torch.Tensor]:
        """``{b: (N, C_b, h_b, w_b)}`` from ONE forward that stops after ``max(blocks)``.

        Args:
            x_t: (N, 4, h, w) noisy latents. timesteps: (N,) integer timesteps.
            blocks: paper block numbers (1..25 for SD 1.x/2.x).
            inject: ``{encoder block: map}`` added to that block's output before it is pushed to the skip stack.
            cond: (1 or N, L, D) text conditioning; None: the null text.
        """
        wanted, deepest = normalize_blocks(blocks, self.num_blocks, self.config_name)
        return self._walk(x_t, timesteps, deepest, cond=cond, inject=inject, keep=set(wanted))[0]

    def _walk(self, x_t: torch.Tensor, timesteps: torch.Tensor, stop_after: int, cond: Any = None,
              inject: Mapping[int, torch.Tensor] | None = None, keep: set[int] | None = None,
              head: bool = False) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        unet = self.unet
        inject = inject or {}
        out: dict[int, torch.Tensor] = {}
        context = self.conditioning(x_t.shape[0], cond)
        emb = unet.time_embedding(unet.get_time_embed(sample=x_t, timestep=timesteps), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        skips: list[torch.Tensor] = []
        h = x_t
        upsample_size = None
        factor = 2 ** (len(unet.up_blocks) - 1)
        forward_upsample_size = any(s % factor != 0 for s in x_t.shape[-2:])

        def record(b: int, value: torch.Tensor, push: bool) -> torch.Tensor:
            if b in inject:
                value = value + inject[b].to(value.dtype)
            if keep is None or b in keep:
                out[b] = value
            if push:
                skips.append(value)
            return value

        for block in self.blocks:
            if block.b > stop_after:
                return out, None
            if block.kind == "conv_in":
                h = record(block.b, unet.conv_in(h), True)
            elif block.kind == "down":
                stage = unet.down_blocks[block.stage]
                h = stage.resnets[block.layer](h, emb)
                h = self._attend(stage, block.layer, h, context)
                h = record(block.b, h, True)
            elif block.kind == "downsample":
                h = record(block.b, unet.down_blocks[block.stage].downsamplers[0](h), True)
            elif block.kind == "mid":
                h = record(block.b, unet.mid_block(h, emb, encoder_hidden_states=context), False)
            else:
                stage = unet.up_blocks[block.stage]
                h = torch.cat([h, skips.pop()], dim=1)
                h = stage.resnets[block.layer](h, emb)
                h = self._attend(stage, block.layer, h, context)
                if block.upsample:
                    if forward_upsample_size and skips:
                        upsample_size = skips[-1].shape[2:]
                    h = stage.upsamplers[0](h, upsample_size)
                h = record(block.b, h, False)
        if not head:
            return out, None
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return out, unet.conv_out(h)

    @staticmethod
    def _attend(stage: nn.Module, layer: int, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        attentions = getattr(stage, "attentions", None)
        if attentions is None or len(attentions) == 0:
            return h
        return attentions[layer](h, encoder_hidden_states=context.to(h.dtype), return_dict=False)[0]
