"""The ADM U-Net and its noisy classifier, with one block-addressable forward walk.

Blocks are numbered as the paper numbers them: for a U-Net with L input blocks, b = 1..L are
``input_blocks[0..L-1]``, b = L+1 is ``middle_block`` and b = L+2..2L+1 are ``output_blocks``
(37 blocks for the 256x256 model). The classifier (encoder only) has blocks 1..L+1.

Everything that runs blocks goes through ``_walk``: ``forward`` walks to the end and applies
``out``; ``features`` walks to the deepest requested block and stops there; DifFeed's second
pass is the same walk with ``inject``.

Factories take guided-diffusion's own flag names and value forms::

    model = create_model(image_size=256, num_channels=256, num_res_blocks=2,
                         attention_resolutions="32,16,8", num_head_channels=64,
                         resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True)
    feats = model.features(x_t, timesteps, blocks=[19, 24, 30])   # {19: ..., 24: ..., 30: ...}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from extract.backbone.adm_layers import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    GroupNorm32,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    timestep_embedding,
    zero_module,
)
from extract.backbone.family import mirror_block, normalize_blocks
from extract.errors import BlockRangeError, ConfigError

__all__ = [
    "UNetModel",
    "EncoderUNetModel",
    "create_model",
    "create_classifier",
    "normalize_blocks",
    "default_channel_mult",
    "NUM_CLASSES",
]

NUM_CLASSES = 1000

# Flags of guided-diffusion's model_and_diffusion / classifier dictionaries that describe the
# diffusion process or training, not the network: accepted and ignored by the factories.
_NON_MODEL_FLAGS = {
    "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
    "rescale_timesteps", "rescale_learned_sigmas", "use_checkpoint",
}


def default_channel_mult(image_size: int, classifier: bool = False) -> tuple[float, ...]:
    """The channel multipliers guided-diffusion derives from the image size."""
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in table:
        kind = "classifier_" if classifier else ""
        raise ConfigError(
            f"no default channel_mult for image_size {image_size} (known: 64, 128, 256, 512): "
            f"pass {kind}channel_mult, e.g. channel_mult='1,2,2'"
        )
    return table[image_size]


def _parse_channel_mult(channel_mult: str | Iterable[float] | None, image_size: int, classifier: bool) -> tuple:
    if channel_mult is None or channel_mult == "":
        return default_channel_mult(image_size, classifier)
    if isinstance(channel_mult, str):
        try:
            values = [float(v) for v in channel_mult.split(",")]
        except ValueError:
            raise ConfigError(f"channel_mult {channel_mult!r} is not a comma-separated list of numbers, e.g. '1,2,2'") from None
    else:
        values = [float(v) for v in channel_mult]
    return tuple(int(v) if v.is_integer() else v for v in values)


def _parse_attention_ds(attention_resolutions: str | Iterable[int], image_size: int) -> tuple[int, ...]:
    """Resolutions with attention ("32,16,8") -> downsampling factors, as guided-diffusion does."""
    if isinstance(attention_resolutions, str):
        parts = [p for p in attention_resolutions.split(",") if p.strip()]
        try:
            resolutions = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"attention_resolutions {attention_resolutions!r} is not a comma-separated list of integers, e.g. '32,16,8'"
            ) from None
    else:
        resolutions = [int(r) for r in attention_resolutions]
    return tuple(image_size // r for r in resolutions)


class _ADMEncoder(nn.Module):
    """What the U-Net and the classifier share: time embedding, input blocks, middle block, walk."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: tuple[int, ...],
        dropout: float = 0.0,
        channel_mult: tuple = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.name = type(self).__name__

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self._layer_args = dict(
            time_embed_dim=time_embed_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm,
            num_heads=num_heads, num_head_channels=num_head_channels, use_new_attention_order=use_new_attention_order,
        )
        attention, resblock = self._attention, self._resblock
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        self._input_block_chans = [ch]
        self._block_ds = [1]  # downsampling factor after each input block
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers: list[nn.Module] = [resblock(ch, out_ch)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._input_block_chans.append(ch)
                self._block_ds.append(ds)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                ds *= 2
                self._input_block_chans.append(ch)
                self._block_ds.append(ds)
        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))
        self._ch, self._ds = ch, ds
        self._middle = len(self.input_blocks) + 1  # block number of middle_block

    def _attention(self, channels: int, num_heads: int | None = None) -> AttentionBlock:
        a = self._layer_args
        return AttentionBlock(channels, num_heads or a["num_heads"], a["num_head_channels"], a["use_new_attention_order"])

    def _resblock(self, channels: int, out_channels: int, up: bool = False, down: bool = False) -> ResBlock:
        a = self._layer_args
        return ResBlock(channels, a["time_embed_dim"], a["dropout"], out_channels,
                        use_scale_shift_norm=a["use_scale_shift_norm"], up=up, down=down)

    # -- block addressing ------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """How many blocks ``features`` can address (2L+1 for the U-Net, L+1 for the classifier)."""
        raise NotImplementedError

    def block_module_name(self, b: int) -> str:
        """State-dict prefix of block b, e.g. ``input_blocks.3``, ``middle_block``."""
        (b,), _ = normalize_blocks([b], self.num_blocks, self.name)
        if b < self._middle:
            return f"input_blocks.{b - 1}"
        if b == self._middle:
            return "middle_block"
        return f"output_blocks.{b - self._middle - 1}"

    def block_module(self, b: int) -> nn.Module:
        return self.get_submodule(self.block_module_name(b))

    def _embed(self, timesteps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            if y is None:
                raise ConfigError(f"{self.name} is class-conditional: pass class labels y")
            raise ConfigError(f"{self.name} is not class-conditional: do not pass y (or set class_cond=True)")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        return emb

    def _run_block(self, b: int, h: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        if b < self._middle:
            return self.input_blocks[b - 1](h, emb)
        if b == self._middle:
            return self.middle_block(h, emb)
        h = torch.cat([h, skips.pop()], dim=1)
        return self.output_blocks[b - self._middle - 1](h, emb)

    def _walk(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None,
        stop_after: int,
        capture: Iterable[int] = (),
        inject: Mapping[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks 1..stop_after once; returns the last output and the captured block outputs.

        ``inject`` maps an encoder block b (< middle) to a map added to that block's output before
        it goes on and onto the skip stack (DifFeed); a map of another size is resized first.
        """
        emb = self._embed(timesteps, y)
        capture = set(capture)
        captured: dict[int, torch.Tensor] = {}
        skips: list[torch.Tensor] = []
        # decoder block b reads encoder block 2L+2-b's output: a walk stopping at stop_after reads only the
        # skips of encoder blocks >= 2L+2-stop_after, so earlier ones are not kept (three 256x256 maps at b=24)
        first_read = 2 * self._middle - stop_after
        h = x
        for b in range(1, stop_after + 1):
            h = self._run_block(b, h, emb, skips)
            if b < self._middle:
                if inject and b in inject:
                    extra = inject[b]
                    if extra.shape[-2:] != h.shape[-2:]:
                        extra = F.interpolate(extra, size=h.shape[-2:], mode="bilinear", align_corners=False)
                    h = h + extra.to(h.dtype)
                skips.append(h if b >= first_read else None)
            if b in capture:
                captured[b] = h
        return h, captured

    def features(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        blocks: int | Iterable[int],
        inject: Mapping[int, torch.Tensor] | None = None,
        cond: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Outputs of the requested blocks from ONE forward that stops after the deepest of them.

        Args:
            x_t: noisy images, (N, 3, H, W), pixels scaled as the model was trained ([-1, 1] based).
            timesteps: (N,) integer diffusion steps.
            blocks: paper block numbers, 1..num_blocks.
            inject: ``{encoder block: (N, C, h, w)}`` maps added to those blocks' outputs, so they also
                feed the skip connections (DifFeed's second pass); resized when sizes differ.
            cond: (N,) class labels (the official forward's ``y``), for class-conditional models only.

        Returns:
            ``{b: (N, C_b, h_b, w_b)}`` in the model's compute dtype.

        Raises:
            BlockRangeError: a block outside 1..num_blocks.
        """
        wanted, deepest = normalize_blocks(blocks, self.num_blocks, self.name)
        timesteps = self._check_timesteps(x_t, timesteps)
        if inject:
            outside = sorted(b for b in inject if not 1 <= b < self._middle)
            if outside:
                raise BlockRangeError(f"inject targets encoder blocks 1..{self._middle - 1} of {self.name}, got {outside}")
        _, captured = self._walk(x_t, timesteps, cond, stop_after=deepest, capture=wanted, inject=inject)
        return captured

    @staticmethod
    def _check_timesteps(x: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape[0] != x.shape[0]:
            raise ConfigError(f"got {timesteps.shape[0]} timesteps for a batch of {x.shape[0]} images")
        return timesteps.to(x.device)

    def block_shapes(self) -> dict[int, tuple[int, int]]:
        """``{b: (channels, spatial size)}`` for every block, derived from the configuration."""
        shapes = {
            b: (ch, self.image_size // ds)
            for b, (ch, ds) in enumerate(zip(self._input_block_chans, self._block_ds), start=1)
        }
        shapes[self._middle] = (self._ch, self.image_size // self._ds)
        return shapes


class UNetModel(_ADMEncoder):
    """The ADM diffusion U-Net (guided-diffusion's ``UNetModel``), 2L+1 addressable blocks.

    Takes ``UNetModel``'s official arguments; those shared with the encoder (dropout,
    channel_mult, num_heads, ...) are passed through to it by keyword.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: tuple[int, ...],
        num_heads_upsample: int = -1,
        **encoder_kwargs: Any,
    ):
        super().__init__(image_size, in_channels, model_channels, num_res_blocks, attention_resolutions, **encoder_kwargs)
        if num_heads_upsample == -1:
            num_heads_upsample = self._layer_args["num_heads"]
        resblock_updown = encoder_kwargs.get("resblock_updown", False)
        conv_resample = encoder_kwargs.get("conv_resample", True)
        channel_mult = self.channel_mult
        self.out_channels = out_channels
        ch, ds = self._ch, self._ds
        skip_chans = list(self._input_block_chans)
        self.output_blocks = nn.ModuleList()
        self._output_block_ds = []
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers: list[nn.Module] = [self._resblock(ch + skip_chans.pop(), out_ch)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(self._attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(self._resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._output_block_ds.append((ch, ds))
        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )

    @property
    def num_blocks(self) -> int:
        return 2 * len(self.input_blocks) + 1

    def mirror_block(self, b: int) -> int:
        """The encoder block whose skip connection decoder block b consumes last: 2L+2-b."""
        return mirror_block(b, self.num_blocks, self.name)

    def block_shapes(self) -> dict[int, tuple[int, int]]:
        shapes = super().block_shapes()
        for i, (ch, ds) in enumerate(self._output_block_ds):
            shapes[self._middle + 1 + i] = (ch, self.image_size // ds)
        return shapes

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The official forward: (N, 3, H, W) noisy images -> (N, out_channels, H, W)."""
        timesteps = self._check_timesteps(x, timesteps)
        h, _ = self._walk(x, timesteps, y, stop_after=self.num_blocks)
        return self.out(h).type(x.dtype)


class EncoderUNetModel(_ADMEncoder):
    """The ADM noisy classifier (guided-diffusion's ``EncoderUNetModel``): L+1 addressable blocks.

    Takes ``EncoderUNetModel``'s official arguments; the shared ones pass through by keyword.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: tuple[int, ...],
        pool: str = "adaptive",
        **encoder_kwargs: Any,
    ):
        super().__init__(image_size, in_channels, model_channels, num_res_blocks, attention_resolutions, **encoder_kwargs)
        num_head_channels = encoder_kwargs.get("num_head_channels", -1)
        self.out_channels = out_channels
        self.pool = pool
        ch = self._ch
        feature_size = sum(self._input_block_chans) + ch
        if pool == "adaptive":
            self.out = nn.Sequential(
                GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(nn.Conv2d(ch, out_channels, 1)), nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ConfigError("classifier_pool='attention' needs num_head_channels (the official value is 64)")
            self.out = nn.Sequential(
                GroupNorm32(ch), nn.SiLU(),
                AttentionPool2d(image_size // self._ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048), GroupNorm32(2048), nn.SiLU(), nn.Linear(2048, out_channels)
            )
        else:
            raise ConfigError(
                f"classifier_pool {pool!r} is unknown: choose adaptive, attention, spatial or spatial_v2"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.input_blocks) + 1

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The official forward: (N, 3, H, W) noisy images -> (N, out_channels) logits."""
        timesteps = self._check_timesteps(x, timesteps)
        if self.pool.startswith("spatial"):
            everything = range(1, self.num_blocks + 1)
            _, captured = self._walk(x, timesteps, None, stop_after=self.num_blocks, capture=everything)
            h = torch.cat([captured[b].type(x.dtype).mean(dim=(2, 3)) for b in everything], dim=-1)
            return self.out(h)
        h, _ = self._walk(x, timesteps, None, stop_after=self.num_blocks)
        return self.out(h.type(x.dtype))


def _check_flags(flags: Mapping[str, Any], known: set[str], factory: str) -> None:
    unknown = sorted(set(flags) - known - _NON_MODEL_FLAGS)
    if unknown:
        raise ConfigError(f"{factory} got unknown flag(s) {', '.join(unknown)}: valid flags are {', '.join(sorted(known))}")


_MODEL_FLAGS = {
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma", "class_cond",
    "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
    "use_scale_shift_norm", "dropout", "resblock_updown", "use_fp16", "use_new_attention_order",
}
_CLASSIFIER_FLAGS = {
    "image_size", "classifier_use_fp16", "classifier_width", "classifier_depth",
    "classifier_attention_resolutions", "classifier_use_scale_shift_norm", "classifier_resblock_updown",
    "classifier_pool", "channel_mult", "num_head_channels",
}


def create_model(**flags: Any) -> UNetModel:
    """Build the ADM U-Net from guided-diffusion's flags (``create_model`` in its script_util).

    Flags and defaults are the official ones: image_size, num_channels, num_res_blocks (required);
    channel_mult ("" = derived from image_size, or "1,2,2"), learn_sigma=False, class_cond=False,
    attention_resolutions="16", num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
    use_scale_shift_norm=False, dropout=0.0, resblock_updown=False, use_fp16=False,
    use_new_attention_order=False. Diffusion flags (diffusion_steps, noise_schedule, ...) are
    accepted and ignored. ``use_fp16`` builds float32 weights: half precision is applied by autocast.

    Raises:
        ConfigError: an unknown flag or an impossible value.
    """
    _check_flags(flags, _MODEL_FLAGS, "create_model")
    for required in ("image_size", "num_channels", "num_res_blocks"):
        if required not in flags:
            raise ConfigError(f"create_model needs {required}")
    image_size = int(flags["image_size"])
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=int(flags["num_channels"]),
        out_channels=6 if flags.get("learn_sigma", False) else 3,
        num_res_blocks=int(flags["num_res_blocks"]),
        attention_resolutions=_parse_attention_ds(flags.get("attention_resolutions", "16"), image_size),
        dropout=float(flags.get("dropout", 0.0)),
        channel_mult=_parse_channel_mult(flags.get("channel_mult", ""), image_size, classifier=False),
        num_classes=NUM_CLASSES if flags.get("class_cond", False) else None,
        num_heads=int(flags.get("num_heads", 1)),
        num_head_channels=int(flags.get("num_head_channels", -1)),
        num_heads_upsample=int(flags.get("num_heads_upsample", -1)),
        use_scale_shift_norm=bool(flags.get("use_scale_shift_norm", False)),
        resblock_updown=bool(flags.get("resblock_updown", False)),
        use_new_attention_order=bool(flags.get("use_new_attention_order", False)),
    )


def create_classifier(**flags: Any) -> EncoderUNetModel:
    """Build the ADM noisy classifier from guided-diffusion's classifier flags.

    Defaults are guided-diffusion's ``classifier_defaults``: classifier_width=128,
    classifier_depth=2, classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
    classifier_pool="attention"; image_size is required. ``channel_mult`` and
    ``num_head_channels`` (official: derived from image_size, and 64) may be overridden so that
    small classifiers can be built.

    Raises:
        ConfigError: an unknown flag or an impossible value.
    """
    _check_flags(flags, _CLASSIFIER_FLAGS, "create_classifier")
    if "image_size" not in flags:
        raise ConfigError("create_classifier needs image_size")
    image_size = int(flags["image_size"])
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=int(flags.get("classifier_width", 128)),
        out_channels=NUM_CLASSES,
        num_res_blocks=int(flags.get("classifier_depth", 2)),
        attention_resolutions=_parse_attention_ds(flags.get("classifier_attention_resolutions", "32,16,8"), image_size),
        channel_mult=_parse_channel_mult(flags.get("channel_mult"), image_size, classifier=True),
        num_head_channels=int(flags.get("num_head_channels", 64)),
        use_scale_shift_norm=bool(flags.get("classifier_use_scale_shift_norm", True)),
        resblock_updown=bool(flags.get("classifier_resblock_updown", True)),
        pool=str(flags.get("classifier_pool", "attention")),
    )
