"""A tiny random Stable Diffusion built with diffusers' and transformers' own classes, saved as SD is distributed.

SD's real block structure (4 stages, 2 layers each, cross-attention in three, 25 blocks) at widths of
8..32 channels, so a forward takes milliseconds. ``save_tiny_sd`` writes the diffusers folder layout
(``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``) with
``save_pretrained``; ``save_single_file`` writes the same weights as one ``.safetensors`` file.
The tokenizer's vocabulary (letters, end-of-word letters, the two special tokens) is written here,
so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from extract.backbone.sd_configs import SD_CONFIGS
from extract.backbone.sd_family import offline_libraries

TINY = SD_CONFIGS["sd-tiny"]


def tiny_tokenizer():
    """A CLIP tokenizer over sd-tiny's 64-token vocabulary: letters, end-of-word letters, ten unused pairs, and
    start and end of text last (62, 63), as CLIP's own vocabulary ends with them."""
    _, transformers = offline_libraries()
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({c + c + "</w>": 52 + i for i, c in enumerate(letters[:10])})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 62, 63
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY.context_length)


def build_tiny_sd(seed: int = 0):
    """``(unet, vae, text_encoder, tokenizer, scheduler)``: random weights drawn from ``seed``."""
    diffusers, transformers = offline_libraries()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**TINY.unet)
    vae = diffusers.AutoencoderKL(**TINY.vae)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY.text))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")
    return unet.eval(), vae.eval(), text.eval(), tiny_tokenizer(), scheduler


def save_tiny_sd(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny SD in the diffusers folder layout; returns the folder."""
    folder = Path(folder)
    unet, vae, text, tokenizer, scheduler = build_tiny_sd(seed)
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text), ("tokenizer", tokenizer),
                       ("scheduler", scheduler)):
        part.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def save_single_file(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The folder's U-Net, VAE and text encoder as one ``.safetensors`` file (diffusers names under part prefixes)."""
    from safetensors.torch import load_file, save_file

    state = {}
    for part in ("unet", "vae", "text_encoder"):
        for name in os.listdir(Path(folder) / part):
            if name.endswith(".safetensors"):
                state.update({f"{part}.{k}": v for k, v in load_file(Path(folder) / part / name).items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
