"""ADM as a backbone family: guided-diffusion's U-Nets and noisy classifiers, by their named configurations.

The modules (``extract.backbone.adm``) keep the official module and parameter names; the named
configurations and the strict checkpoint load are ``extract.backbone.configs``. This module only
answers :class:`~extract.backbone.family.BackboneFamily`'s questions for them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from extract.backbone.configs import NAMED_CONFIGS, checked_state, get_config
from extract.backbone.family import BackboneFamily
from extract.backbone.random_init import init_random_weights
from extract.schedule import NoiseSchedule, get_schedule

__all__ = ["ADMFamily"]


class ADMFamily(BackboneFamily):
    """guided-diffusion's ADM: images in [-1, 1], linear or cosine schedule, class labels as the only conditioning."""

    name = "adm"
    inputs = "pixels"

    def config_names(self) -> tuple[str, ...]:
        return tuple(NAMED_CONFIGS)

    def input_size(self, config_name: str) -> int:
        return get_config(config_name).image_size

    def schedule(self, config_name: str) -> NoiseSchedule:
        cfg = get_config(config_name)
        return get_schedule(cfg.noise_schedule, cfg.diffusion_steps)

    def create(self, config_name: str, checkpoint: str | None = None, weight_seed: int | None = None,
               **overrides: Any) -> nn.Module:
        """Build a named ADM in eval mode.

        Args:
            config_name: a named configuration. checkpoint: an official ``.pt`` file, loaded strictly.
            weight_seed: without a checkpoint, draw every weight from this seed with
                ``init_random_weights`` (blocks then do real work); None keeps ADM's own
                initialisation (zeroed residual branches, drawn from the global RNG).
            overrides: flags that win over the named ones.

        Raises:
            ConfigError: unknown name or flag. CheckpointError: unreadable or mismatching checkpoint.
        """
        cfg = get_config(config_name)
        if checkpoint is None:
            model = cfg.build(**overrides)
            if weight_seed is not None:
                init_random_weights(model, weight_seed)
            return model.eval()
        model, state = checked_state(cfg, checkpoint, overrides)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def spec_fields(self, config_name: str, image_size: int | None = None, conditioning: str | None = None) -> dict:
        cfg = get_config(config_name)
        return dict(config_flags=cfg.flags, image_size=int(image_size or cfg.image_size), noise_schedule=cfg.noise_schedule,
                    diffusion_steps=cfg.diffusion_steps)

    def official_checkpoint(self, config_name: str) -> str:
        return get_config(config_name).checkpoint_file

    def extract_refusal(self, config_name: str) -> str | None:
        cfg = get_config(config_name)
        if cfg.flags.get("class_cond"):
            return (f"{cfg.name} is class-conditional and extract has no class label to give it: "
                    f"use an unconditional backbone such as --config 256x256_uncond")
        return None

    def check_checkpoint(self, config_name: str, checkpoint: str) -> None:
        from extract.backbone.configs import check_checkpoint

        check_checkpoint(config_name, checkpoint)

    def build_meta(self, config_name: str) -> nn.Module:
        with torch.device("meta"):
            return get_config(config_name).build()

    def example_inputs(self, config_name: str, model: nn.Module, batch: int) -> tuple:
        size = self.input_size(config_name)
        x = torch.empty(batch, 3, size, size, device="meta")
        t = torch.zeros(batch, dtype=torch.long, device="meta")
        y = torch.zeros(batch, dtype=torch.long, device="meta") if getattr(model, "num_classes", None) else None
        return x, t, y
