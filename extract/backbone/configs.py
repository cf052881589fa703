"""Named ADM configurations: every official checkpoint's flags, plus small ones for tests and demos.

Architecture flags (what ``create_model`` / ``create_classifier`` take) live here apart from
checkpoint metadata (the official file name), as timm keeps ``default_cfgs`` apart from the modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extract.backbone.adm import create_classifier, create_model
from extract.backbone.checkpoint import compare_state_dict, read_state_dict, state_dict_layout
from extract.errors import CheckpointError, ConfigError

__all__ = ["BackboneConfig", "NAMED_CONFIGS", "get_config", "checked_state", "explain_mismatch", "check_checkpoint",
           "bundled_checkpoint", "WEIGHTS_DIR"]

#: Checkpoints diffrep trained itself and ships (``<config>.pt`` with ``<config>.json`` beside it).
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@dataclass(frozen=True)
class BackboneConfig:
    """A named backbone: its factory flags, its noise schedule, and its official checkpoint.

    Args:
        name: e.g. ``256x256_uncond``.
        kind: ``unet`` (diffusion model, blocks 1..2L+1) or ``classifier`` (blocks 1..L+1).
        flags: guided-diffusion flags for ``create_model`` / ``create_classifier``.
        noise_schedule: ``linear`` or ``cosine``; diffusion_steps: T.
        checkpoint_file: the official file name ('' for configurations without one).
    """

    name: str
    kind: str
    flags: dict[str, Any]
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    checkpoint_file: str = ""
    description: str = ""

    @property
    def image_size(self) -> int:
        return int(self.flags["image_size"])

    def build(self, **overrides: Any) -> nn.Module:
        """Instantiate the module (random init); overrides win over the named flags."""
        flags = {**self.flags, **overrides}
        return create_model(**flags) if self.kind == "unet" else create_classifier(**flags)


_ADM_256 = dict(
    image_size=256, num_channels=256, num_res_blocks=2, num_heads=4, num_head_channels=64,
    attention_resolutions="32,16,8", channel_mult="", dropout=0.0, use_scale_shift_norm=True,
    resblock_updown=True, use_new_attention_order=False, learn_sigma=True, num_heads_upsample=-1,
)


def _classifier(image_size: int, depth: int = 2) -> dict[str, Any]:
    return dict(
        image_size=image_size, classifier_width=128, classifier_depth=depth,
        classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention",
    )


NAMED_CONFIGS: dict[str, BackboneConfig] = {
    cfg.name: cfg
    for cfg in [
        BackboneConfig(
            "64x64_cond", "unet",
            dict(_ADM_256, image_size=64, num_channels=192, num_res_blocks=3, dropout=0.1,
                 use_new_attention_order=True, class_cond=True),
            noise_schedule="cosine", checkpoint_file="64x64_diffusion.pt",
            description="ImageNet 64x64 class-conditional (new attention order, cosine schedule)",
        ),
        BackboneConfig(
            "128x128_cond", "unet",
            dict(_ADM_256, image_size=128, num_head_channels=-1, class_cond=True),
            checkpoint_file="128x128_diffusion.pt",
            description="ImageNet 128x128 class-conditional",
        ),
        BackboneConfig(
            "256x256_cond", "unet", dict(_ADM_256, class_cond=True),
            checkpoint_file="256x256_diffusion.pt",
            description="ImageNet 256x256 class-conditional",
        ),
        BackboneConfig(
            "256x256_uncond", "unet", dict(_ADM_256, class_cond=False),
            checkpoint_file="256x256_diffusion_uncond.pt",
            description="ImageNet 256x256 unconditional: the paper's main backbone",
        ),
        BackboneConfig(
            "512x512_cond", "unet", dict(_ADM_256, image_size=512, class_cond=True),
            checkpoint_file="512x512_diffusion.pt",
            description="ImageNet 512x512 class-conditional",
        ),
        BackboneConfig("64x64_classifier", "classifier", _classifier(64, depth=4),
                       checkpoint_file="64x64_classifier.pt", description="noisy ImageNet classifier, 64x64"),
        BackboneConfig("128x128_classifier", "classifier", _classifier(128),
                       checkpoint_file="128x128_classifier.pt", description="noisy ImageNet classifier, 128x128"),
        BackboneConfig("256x256_classifier", "classifier", _classifier(256),
                       checkpoint_file="256x256_classifier.pt", description="noisy ImageNet classifier, 256x256"),
        BackboneConfig("512x512_classifier", "classifier", _classifier(512),
                       checkpoint_file="512x512_classifier.pt", description="noisy ImageNet classifier, 512x512"),
        # Small configuration with every code path of the official ones (resblock up/down,
        # scale-shift norm, multi-head attention at two resolutions): tests, demos, CPU runs.
        BackboneConfig(
            "32x32_small", "unet",
            dict(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,2,2",
                 attention_resolutions="16,8", num_heads=1, num_head_channels=8, num_heads_upsample=-1,
                 resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True, dropout=0.0,
                 class_cond=False, use_new_attention_order=False),
            description="2M-parameter ADM for 32x32 images (tests and the demo; no official checkpoint)",
        ),
    ]
}


def get_config(name: str) -> BackboneConfig:
    """Look up a named configuration.

    Raises:
        ConfigError: the name is unknown (the message lists the known ones).
    """
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown configuration {name!r}: choose one of {', '.join(NAMED_CONFIGS)}") from None


def checked_state(cfg: BackboneConfig, checkpoint: str, overrides: dict) -> tuple[nn.Module, dict]:
    """(model on the meta device, state dict) once the file is known to fit the configuration exactly.

    Load with ``model.load_state_dict(state, strict=True, assign=True)``.

    Raises:
        CheckpointError: unreadable file, or one that does not fit (the message names the keys, shapes and remedy).
    """
    state = read_state_dict(checkpoint)
    with torch.device("meta"):  # no random init of 550M parameters only to overwrite them
        model = cfg.build(**overrides)
    problem = explain_mismatch(model, state, cfg.name)
    if problem:
        raise CheckpointError(f"{problem} (file {checkpoint})")
    return model, state


def explain_mismatch(model: nn.Module, state: dict, config_name: str) -> str | None:
    """None when ``state`` fits ``model``, else one line naming the mismatch and the remedy.

    When the file fits another named configuration exactly, the remedy is ``use --config <that one>``.
    """
    problem = compare_state_dict(model, state, config_name)
    if problem is None:
        return None
    other = _fits_named_config({k: tuple(v.shape) for k, v in state.items()}, skip=config_name)
    return compare_state_dict(model, state, config_name, remedy=f"it fits {other}: use --config {other}") if other else problem


def _fits_named_config(found: dict[str, tuple], skip: str | None) -> str | None:
    """The name of a named configuration whose layout equals ``found``, if any."""
    for name, cfg in NAMED_CONFIGS.items():
        if name == skip:
            continue
        with torch.device("meta"):
            layout = state_dict_layout(cfg.build())
        if layout == found:
            return name
    return None


def check_checkpoint(name: str, checkpoint: str, **overrides: Any) -> None:
    """Raise CheckpointError unless ``checkpoint`` loads strictly into configuration ``name``.

    For planners: a run checks its checkpoint once, before any task starts.
    """
    checked_state(get_config(name), checkpoint, overrides)


def bundled_checkpoint(name: str) -> str | None:
    """The checkpoint diffrep ships for configuration ``name`` (EMA weights it trained), or None.

    ``extract/weights/32x32_small.pt`` is ``32x32_small`` trained text-free on the CIFAR-10 training
    images by ``make pretrain``; its JSON records the command, steps, data and time.
    """
    path = WEIGHTS_DIR / f"{name}.pt"
    return str(path) if path.is_file() else None
