"""The backbone-family interface: what a family of diffusion backbones provides so that everything downstream is family-blind.

A *family* (ADM today; Stable Diffusion through diffusers later) is one module holding one
:class:`BackboneFamily` subclass, plus one entry in ``extract.backbone.registry.FAMILIES``. It
names its configurations and, for each one, provides:

- the module it builds (``create``), which satisfies :class:`BlockwiseBackbone`: blocks numbered
  as the paper numbers ADM's (b = 1..L encoder blocks, L+1 the middle block, L+2..2L+1 decoder
  blocks), and ``features(x_t, timesteps, blocks, inject=None, cond=None)`` that runs ONE forward
  and stops after the deepest requested block;
- its preprocessing (``inputs``): ``"pixels"`` (images in [-1, 1], (N, 3, H, W)) or ``"latent"``
  (a VAE latent, which the family's own encoder produces);
- its noise schedule (``schedule``);
- its block table (``block_table``: b -> module name, channels, side and stride at the
  configuration's input size, cumulative FLOPs, parameters), measured here once for every family;
- block-range normalisation and the mirror block (the encoder block whose skip a decoder block
  reads, the target of DifFeed's feedback), both computed from the configuration's block count;
- the identity of its weights, ``<config>-<sha12>`` (``extract.backbone.identity``), and a cheap
  check of a checkpoint before any job starts (``check_checkpoint``);
- what the cache spec records of it (``spec_fields``: image size, schedule, conditioning, latent
  choice), the image sizes it takes (``image_size``, ``--image-size``), and the shape of its x0
  and noise at an image size (``input_shape``: (3, S, S) pixels, or the latent's).

A ``latent`` family's module also offers ``encode(pixels) -> x0`` (``extract.forward.model_input``
calls it before the noise is added) and ``input_shape(image_size)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from extract.backbone.identity import backbone_id
from extract.errors import BlockRangeError
from extract.schedule import NoiseSchedule

__all__ = ["BlockwiseBackbone", "BackboneFamily", "BlockRow", "normalize_blocks", "mirror_block"]


def normalize_blocks(blocks: int | Iterable[int], num_blocks: int, name: str = "this backbone") -> tuple[tuple[int, ...], int]:
    """Check block numbers once: returns (sorted unique blocks, deepest block).

    Raises:
        BlockRangeError: a block outside 1..num_blocks, or no block at all.
    """
    if isinstance(blocks, int):
        blocks = [blocks]
    wanted = sorted({int(b) for b in blocks})
    if not wanted:
        raise BlockRangeError(f"no block requested for {name}: valid blocks are 1..{num_blocks}")
    for b in wanted:
        if not 1 <= b <= num_blocks:
            raise BlockRangeError(f"block {b} is out of range for {name}: valid blocks are 1..{num_blocks}")
    return tuple(wanted), wanted[-1]


def mirror_block(b: int, num_blocks: int, name: str = "this backbone") -> int:
    """The encoder block whose skip connection decoder block ``b`` of a U-Net reads last: ``2L + 2 - b``.

    ``num_blocks`` is the U-Net's 2L+1 (37 for the 256x256 ADM: b=24 mirrors 14).

    Raises:
        BlockRangeError: ``b`` is not a decoder block (L+2..2L+1).
    """
    middle = num_blocks // 2 + 1
    if not middle < b <= num_blocks:
        raise BlockRangeError(f"block {b} of {name} has no mirror: decoder blocks are {middle + 1}..{num_blocks}")
    return num_blocks + 1 - b


@runtime_checkable
class BlockwiseBackbone(Protocol):
    """What the module a family builds offers downstream (the extract job, live heads, DifFeed)."""

    @property
    def num_blocks(self) -> int:
        """How many blocks ``features`` can address (2L+1 for a U-Net, L+1 for an encoder)."""

    def features(self, x_t: torch.Tensor, timesteps: torch.Tensor, blocks: int | Iterable[int],
                 inject: Mapping[int, torch.Tensor] | None = None, cond: Any = None) -> dict[int, torch.Tensor]:
        """``{b: (N, C_b, h_b, w_b)}`` from ONE forward that stops after ``max(blocks)``.

        ``inject``: ``{encoder block: map}`` added to those blocks' outputs (DifFeed's second pass);
        ``cond``: the family's conditioning (ADM: class labels; None for text-free models).
        """

    def block_shapes(self) -> dict[int, tuple[int, int]]:
        """``{b: (channels, side)}`` at the configuration's input size."""

    def block_module_name(self, b: int) -> str:
        """State-dict prefix of block b (the official name, e.g. ``input_blocks.3``)."""

    def block_module(self, b: int) -> nn.Module:
        """The submodule whose output is block b."""


@dataclass(frozen=True)
class BlockRow:
    """One row of a block table: block b, the module producing it, its output and the cost to reach it.

    ``size`` is the output's side and ``stride`` the input side over it (pixels, or latent cells);
    ``flops_cum`` counts the forward up to and including b (batch 1 by default).
    """

    b: int
    module: str
    channels: int
    size: int
    stride: int
    flops_cum: int
    params: int


class BackboneFamily(ABC):
    """One family of diffusion backbones: its named configurations and what each one provides.

    Subclasses set ``name`` and ``inputs`` and implement the abstract methods; the block table,
    block normalisation, the mirror block and the weights' identity follow from those.
    """

    #: the registry key, e.g. ``adm``
    name: ClassVar[str]
    #: ``pixels`` (images in [-1, 1], (N, 3, H, W)) or ``latent`` (a VAE latent)
    inputs: ClassVar[str]

    @abstractmethod
    def config_names(self) -> tuple[str, ...]:
        """The named configurations of this family."""

    @abstractmethod
    def input_size(self, config_name: str) -> int:
        """Side of the square input the configuration was trained at (pixels, or latent cells)."""

    @abstractmethod
    def schedule(self, config_name: str) -> NoiseSchedule:
        """The noise schedule the configuration was trained with (q_sample, valid timesteps)."""

    @abstractmethod
    def create(self, config_name: str, checkpoint: str | None = None, weight_seed: int | None = None,
               **overrides: Any) -> nn.Module:
        """The backbone in eval mode, a :class:`BlockwiseBackbone`: the checkpoint loaded strictly, or random
        weights (a pure function of ``weight_seed`` when given)."""

    @abstractmethod
    def build_meta(self, config_name: str) -> nn.Module:
        """The configuration's module on the meta device (shapes only, no weights): for tables and plans."""

    @abstractmethod
    def example_inputs(self, config_name: str, model: nn.Module, batch: int) -> tuple:
        """Arguments of one full ``model(...)`` forward on the meta device (for counting FLOPs)."""

    def num_blocks(self, config_name: str) -> int:
        return self.build_meta(config_name).num_blocks

    def image_size(self, config_name: str) -> int:
        """Default image side in pixels (``--image-size`` overrides it where the family allows)."""
        return self.input_size(config_name)

    def table_sizes(self, config_name: str) -> tuple[int, ...]:
        """Image sizes ``diffrep info`` shows block sides at (the first is the table's own)."""
        return (self.image_size(config_name),)

    def input_shape(self, config_name: str, image_size: int) -> tuple[int, int, int]:
        """Shape of one image's x0 and noise at ``image_size`` pixels: (3, S, S) for a pixel family."""
        return (3, int(image_size), int(image_size))

    def block_shapes(self, config_name: str, image_size: int | None = None) -> dict[int, tuple[int, int]]:
        """``{b: (channels, side)}`` at ``image_size`` pixels (None: the configuration's own size)."""
        shapes = self.build_meta(config_name).block_shapes()
        if image_size is None or image_size == self.image_size(config_name):
            return shapes
        scale = image_size / self.image_size(config_name)
        return {b: (c, max(1, round(side * scale))) for b, (c, side) in shapes.items()}

    def spec_fields(self, config_name: str, image_size: int | None = None, conditioning: str | None = None) -> dict:
        """What a cache spec records of this backbone besides its id (``extract.cache.CacheSpec`` fields)."""
        raise NotImplementedError

    def official_checkpoint(self, config_name: str) -> str:
        """The name of the file its authors published ('' when there is none to name)."""
        return ""

    def extract_refusal(self, config_name: str) -> str | None:
        """Why ``extract`` cannot run this configuration (None: it can)."""
        return None

    def check_checkpoint(self, config_name: str, checkpoint: str) -> None:
        """Raise CheckpointError, before any job starts, when ``checkpoint`` cannot load into the configuration."""

    def checkpoint_sha256(self, checkpoint: str) -> str:
        """SHA-256 of the weights (hashed once per file version)."""
        from extract.backbone.identity import checkpoint_sha256

        return checkpoint_sha256(checkpoint)

    def normalize_blocks(self, config_name: str, blocks: int | Iterable[int]) -> tuple[tuple[int, ...], int]:
        """(sorted unique blocks, deepest block) of ``config_name``, or a one-line BlockRangeError."""
        return normalize_blocks(blocks, self.num_blocks(config_name), config_name)

    def mirror_block(self, config_name: str, b: int) -> int:
        """The encoder block decoder block ``b`` feeds back to in DifFeed (``2L + 2 - b``)."""
        return mirror_block(b, self.num_blocks(config_name), config_name)

    def backbone_id(self, config_name: str, checkpoint: str | None = None, weight_seed: int | None = None) -> str:
        """The weights' identity, ``<config>-<sha12>`` or ``<config>-random<seed>``: cache folders and results rows."""
        return backbone_id(config_name, checkpoint, weight_seed)

    def block_table(self, config_name: str, batch: int = 1) -> list[BlockRow]:
        """One row per block, plus a final row ``b=0, module='total'`` for the full forward and all parameters.

        FLOPs are counted on the meta device (no memory, no arithmetic) under ``FlopCounterMode``:
        2 x multiply-adds of convolutions, linear layers and attention matmuls. Cumulative FLOPs to
        reach b include the embeddings and every block before b.
        """
        model = self.build_meta(config_name).eval()
        counter = FlopCounterMode(display=False)
        cumulative: dict[int, int] = {}
        handles = []
        for b in range(1, model.num_blocks + 1):
            def record(_module, _inputs, _output, b=b):
                cumulative[b] = counter.get_total_flops()

            handles.append(model.block_module(b).register_forward_hook(record))
        try:
            with counter, torch.no_grad():
                model(*self.example_inputs(config_name, model, batch))
        finally:
            for handle in handles:
                handle.remove()
        size = self.input_size(config_name)
        shapes = model.block_shapes()
        rows = [
            BlockRow(b=b, module=model.block_module_name(b), channels=shapes[b][0], size=shapes[b][1],
                     stride=size // shapes[b][1], flops_cum=cumulative[b],
                     params=sum(p.numel() for p in model.block_module(b).parameters()))
            for b in range(1, model.num_blocks + 1)
        ]
        rows.append(BlockRow(0, "total", 0, 0, 0, counter.get_total_flops(), sum(p.numel() for p in model.parameters())))
        return rows
