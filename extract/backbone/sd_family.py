"""Stable Diffusion as a backbone family, through diffusers: strictly offline loading, identity, schedule and block table.

``--checkpoint`` is a local folder in the diffusers layout (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``; ``scheduler/`` is not read: SD's schedule is fixed, scaled-linear betas over 1000
steps) or one ``.safetensors`` file, either the original (LDM) layout (``model.diffusion_model.``,
``first_stage_model.``, ``cond_stage_model.``), converted with diffusers' own converters, or
diffusers' layout under ``unet.``/``vae.``/``text_encoder.`` prefixes. Nothing is ever fetched: the
hub libraries' offline switches are set before they are imported, every load passes
``local_files_only``, and a hub name or a missing path is one line saying what to put where.

The weights' identity is ``<config>-<sha12>``: the SHA-256 of the file, or of a folder's weight
files (their relative paths and digests, sorted), so the same weights give the same cache folder.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import torch
from torch import nn

from extract.backbone.checkpoint import file_sha256
from extract.backbone.family import BackboneFamily
from extract.backbone.sd_configs import SCALED_LINEAR, SD_CONFIGS, SDConfig, get_sd_config
from extract.backbone.sd_unet import LATENT_CHOICE, SDUNetBackbone
from extract.errors import CheckpointError
from extract.schedule import NoiseSchedule, get_schedule

__all__ = ["SDFamily", "offline_libraries", "null_text_embedding", "NULL_TEXT", "LEARNABLE"]

NULL_TEXT = "null-text"
LEARNABLE = "learnable"
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "DIFFUSERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1"}
_PARTS = ("unet", "vae", "text_encoder")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def offline_libraries() -> tuple[Any, Any]:
    """``(diffusers, transformers)``, imported with every offline switch set first, so no load can reach the network."""
    os.environ.update(_OFFLINE)
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True  # in case the hub library was imported before the switches were set
    import diffusers
    import transformers

    # diffrep reports its own progress: no per-load progress bars or advice to install more packages
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return diffusers, transformers


def null_text_embedding(text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(1, L, D) the text encoder's last hidden state for the empty prompt's tokens (as SD's pipelines encode ``""``)."""
    with torch.no_grad():
        return text_encoder(input_ids.to(next(text_encoder.parameters()).device))[0].float()


def _null_ids(cfg: SDConfig, tokenizer: Any | None) -> torch.Tensor:
    length = cfg.context_length
    if tokenizer is not None:
        return tokenizer([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    bos, eos, pad = cfg.null_ids
    return torch.tensor([[bos, eos] + [pad] * (length - 2)], dtype=torch.long)


class SDFamily(BackboneFamily):
    """Stable Diffusion through diffusers: images -> VAE latent (posterior mean x scaling factor), scaled-linear
    schedule, text conditioning (the null text, or a learnable embedding passed as ``cond``)."""

    name = "sd"
    inputs = "latent"

    def config_names(self) -> tuple[str, ...]:
        return tuple(SD_CONFIGS)

    def input_size(self, config_name: str) -> int:
        return get_sd_config(config_name).image_size // 8

    def image_size(self, config_name: str) -> int:
        return get_sd_config(config_name).image_size

    def table_sizes(self, config_name: str) -> tuple[int, ...]:
        return get_sd_config(config_name).table_sizes

    def input_shape(self, config_name: str, image_size: int) -> tuple[int, int, int]:
        return (int(get_sd_config(config_name).unet["in_channels"]), image_size // 8, image_size // 8)

    def schedule(self, config_name: str) -> NoiseSchedule:
        return get_schedule(SCALED_LINEAR, 1000)

    def spec_fields(self, config_name: str, image_size: int | None = None, conditioning: str | None = None) -> dict:
        cfg = get_sd_config(config_name)
        scaling = cfg.vae["scaling_factor"]
        return dict(config_flags=cfg.flags, image_size=int(image_size or cfg.image_size),
                    noise_schedule=SCALED_LINEAR, diffusion_steps=1000, family=self.name,
                    conditioning=conditioning or NULL_TEXT, latent=f"{LATENT_CHOICE}*{scaling}")

    def build_meta(self, config_name: str) -> nn.Module:
        cfg = get_sd_config(config_name)
        diffusers, _ = offline_libraries()
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**cfg.unet)
            null = torch.empty(1, cfg.context_length, cfg.context_dim)
        return SDUNetBackbone(unet, None, null, cfg.vae["scaling_factor"], config_name).eval()

    def block_table(self, config_name: str, batch: int = 1, image_size: int | None = None) -> list:
        """The block table at the configuration's image size, or at ``image_size`` pixels (FLOPs change with it)."""
        self._table_image_size = image_size
        try:
            return super().block_table(config_name, batch)
        finally:
            self._table_image_size = None

    def example_inputs(self, config_name: str, model: nn.Module, batch: int) -> tuple:
        image_size = getattr(self, "_table_image_size", None)
        side = image_size // 8 if image_size else self.input_size(config_name)
        x = torch.empty(batch, model.latent_channels, side, side, device="meta")
        return x, torch.zeros(batch, dtype=torch.long, device="meta")

    def block_shapes(self, config_name: str, image_size: int | None = None) -> dict[int, tuple[int, int]]:
        return self.build_meta(config_name).block_shapes(image_size)

    def create(self, config_name: str, checkpoint: str | None = None, weight_seed: int | None = None,
               **overrides: Any) -> nn.Module:
        """Build a named SD backbone in eval mode, from a local checkpoint or random weights.

        Args:
            config_name: ``sd15``, ``sd21``, ``sd21-base`` or ``sd-tiny``.
            checkpoint: a diffusers folder or one ``.safetensors`` file (never a hub name: nothing is fetched).
            weight_seed: without a checkpoint, every weight drawn from this seed (the global RNG is untouched).

        Raises:
            CheckpointError: a hub name, a missing path, a folder without a part, weights that do not fit.
        """
        cfg = get_sd_config(config_name)
        if overrides:
            raise CheckpointError(f"{config_name} takes no flags ({', '.join(overrides)}): its layout comes from the config")
        if checkpoint is None:
            unet, vae, text_encoder, tokenizer = self._random(cfg, weight_seed)
        else:
            path = require_sd_checkpoint(checkpoint)
            if os.path.isdir(path):
                unet, vae, text_encoder, tokenizer = self._from_folder(cfg, path)
            else:
                unet, vae, text_encoder, tokenizer = self._from_file(cfg, path)
        null = null_text_embedding(text_encoder.eval(), _null_ids(cfg, tokenizer))
        scaling = float(vae.config.scaling_factor or cfg.vae["scaling_factor"])
        return SDUNetBackbone(unet.eval(), vae.eval(), null, scaling, config_name).eval()

    def check_checkpoint(self, config_name: str, checkpoint: str) -> None:
        """Cheap check before any job starts: the path exists locally and (for a folder) its U-Net has the layout."""
        cfg = get_sd_config(config_name)
        path = require_sd_checkpoint(checkpoint)
        if os.path.isdir(path):
            diffusers, _ = offline_libraries()
            _check_layout(cfg, diffusers.UNet2DConditionModel.load_config(os.path.join(path, "unet"),
                                                                           local_files_only=True), path)

    def checkpoint_sha256(self, checkpoint: str) -> str:
        path = os.path.realpath(require_sd_checkpoint(checkpoint))
        return _folder_sha256(path) if os.path.isdir(path) else _file_sha256(path, *_version(path))

    def backbone_id(self, config_name: str, checkpoint: str | None = None, weight_seed: int | None = None) -> str:
        if checkpoint:
            return f"{config_name}-{self.checkpoint_sha256(checkpoint)[:12]}"
        return f"{config_name}-random{int(weight_seed or 0)}"

    def _random(self, cfg: SDConfig, weight_seed: int | None):
        diffusers, transformers = offline_libraries()
        with torch.random.fork_rng(devices=[]):
            if weight_seed is not None:
                torch.manual_seed(int(weight_seed))
            unet = diffusers.UNet2DConditionModel(**cfg.unet)
            vae = diffusers.AutoencoderKL(**cfg.vae)
            text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.text))
        return unet, vae, text_encoder, None

    def _from_folder(self, cfg: SDConfig, path: str):
        diffusers, transformers = offline_libraries()
        for part in _PARTS:
            if not os.path.isdir(os.path.join(path, part)):
                raise CheckpointError(
                    f"checkpoint folder {path} has no {part}/: a diffusers folder holds unet/, vae/, text_encoder/ and "
                    f"tokenizer/ (what save_pretrained writes); copy the model there, or pass a single .safetensors file")
        unet_config = diffusers.UNet2DConditionModel.load_config(os.path.join(path, "unet"), local_files_only=True)
        _check_layout(cfg, unet_config, path)
        try:
            unet = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
            vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
            text_encoder = transformers.CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                                      local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint folder {path} does not load as {cfg.name}: {_first_line(exc)}") from None
        tokenizer = None
        if os.path.isdir(os.path.join(path, "tokenizer")):
            tokenizer = transformers.CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        if text_encoder.config.hidden_size != cfg.context_dim:
            raise CheckpointError(f"checkpoint folder {path} does not fit {cfg.name}: its text encoder is "
                                  f"{text_encoder.config.hidden_size} wide, the U-Net reads {cfg.context_dim}")
        return unet, vae, text_encoder, tokenizer

    def _from_file(self, cfg: SDConfig, path: str):
        from safetensors.torch import load_file

        if not path.endswith(".safetensors"):
            raise CheckpointError(f"checkpoint {path} is not a .safetensors file: pass a diffusers folder or a "
                                  f"single .safetensors checkpoint (diffrep never unpickles SD checkpoints)")
        try:
            state = load_file(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
            raise CheckpointError(f"checkpoint {path} cannot be read as safetensors: {_first_line(exc)}") from None
        unet, vae, text_encoder, _ = self._random(cfg, 0)
        if any(k.startswith("model.diffusion_model.") for k in state):
            parts = _convert_ldm(cfg, state, text_encoder)
        elif any(k.startswith("unet.") for k in state):
            parts = {part: {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")} for part in _PARTS}
        else:
            raise CheckpointError(f"checkpoint {path} is neither SD's original layout (model.diffusion_model.*) nor "
                                  f"diffusers' (unet.*, vae.*, text_encoder.*): pass a Stable Diffusion checkpoint")
        for part, module in zip(_PARTS, (unet, vae, text_encoder)):
            _load_strict(module, parts[part], part, path, cfg.name)
        tokenizer = None
        beside = os.path.join(os.path.dirname(path), "tokenizer")
        if os.path.isdir(beside):  # a tokenizer/ folder next to the file wins over the config's token ids
            _, transformers = offline_libraries()
            tokenizer = transformers.CLIPTokenizer.from_pretrained(beside, local_files_only=True)
        return unet, vae, text_encoder, tokenizer


def require_sd_checkpoint(checkpoint: str) -> str:
    """The local path of an SD checkpoint, or a one-line CheckpointError saying what to put where.

    Raises:
        CheckpointError: a hub name (``org/model``), or a path that does not exist.
    """
    path = os.path.expanduser(os.fspath(checkpoint))
    if os.path.exists(path):
        return path
    parts = path.split("/")
    if len(parts) == 2 and all(parts) and not path.startswith((".", "~")):
        raise CheckpointError(
            f"checkpoint {checkpoint!r} looks like a hub name and diffrep never downloads: put the model on this machine "
            f"as a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or one .safetensors file and pass its path")
    raise CheckpointError(
        f"checkpoint {path} does not exist: pass a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) "
        f"or one .safetensors file to --checkpoint")


def _check_layout(cfg: SDConfig, unet_config: dict, path: str) -> None:
    for key in cfg.layout_keys:
        have, want = unet_config.get(key), cfg.unet.get(key)
        if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)):
            have, want = list(have), list(want)
        if have != want:
            others = [name for name, other in SD_CONFIGS.items()
                      if all(_same(unet_config.get(k), other.unet.get(k)) for k in other.layout_keys)]
            hint = f"pass --config {others[0]}" if others else "it is not a U-Net diffrep knows"
            raise CheckpointError(f"checkpoint {path} does not fit {cfg.name}: unet {key} is {have}, not {want}; {hint}")


def _same(a: Any, b: Any) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def _load_strict(module: nn.Module, state: dict, part: str, path: str, name: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    # transformers keeps position_ids as a buffer some files have and some do not
    missing = [k for k in missing if not k.endswith("position_ids")]
    extra = [k for k in extra if not k.endswith("position_ids")]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        what = (f"{part}.{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {tuple(own[wrong[0]].shape)}" if wrong
                else f"{len(missing)} {part} weights missing (e.g. {missing[0]})" if missing
                else f"{len(extra)} unexpected {part} weights (e.g. {extra[0]})")
        raise CheckpointError(f"checkpoint {path} does not fit {name}: {what}; pass the --config it was trained as")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _convert_ldm(cfg: SDConfig, state: dict, text_encoder: nn.Module) -> dict[str, dict]:
    """SD's original single-file layout -> diffusers' names, with diffusers' own converters."""
    from diffusers.loaders import single_file_utils as convert

    unet = convert.convert_ldm_unet_checkpoint(state, dict(cfg.unet))
    vae = convert.convert_ldm_vae_checkpoint(state, dict(cfg.vae))
    if cfg.null_ids[2] == 0:  # SD 2.x: OpenCLIP weights under cond_stage_model.model.
        text = convert.convert_open_clip_checkpoint(text_encoder, state)
    else:
        text = convert.convert_ldm_clip_checkpoint(state)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def _version(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def _folder_sha256(path: str) -> str:
    """SHA-256 over the sorted (relative path, SHA-256) of the weight files of unet/, vae/, text_encoder/."""
    digest = hashlib.sha256()
    found = False
    for part in _PARTS:
        folder = os.path.join(path, part)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(_WEIGHT_SUFFIXES):
                full = os.path.join(folder, name)
                digest.update(f"{part}/{name}:{_file_sha256(full, *_version(full))}\n".encode())
                found = True
    if not found:
        raise CheckpointError(f"checkpoint folder {path} holds no weights under unet/, vae/, text_encoder/: copy the "
                              f"diffusers model there (save_pretrained layout)")
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
