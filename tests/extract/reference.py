"""Paths to ../shared/reference and small helpers the backbone tests share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pipeline.manifest import default_shared_dir
from tests.shared_data import missing_shared

SHARED = default_shared_dir()
REFERENCE = SHARED / "reference"

GOLDEN_FILES = ["adm_small.npz", "adm_small_unitscale.npz"]
MODEL_FLAG_NAMES = [
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
    "num_head_channels", "num_heads_upsample", "resblock_updown", "use_scale_shift_norm", "learn_sigma",
    "dropout", "class_cond", "use_new_attention_order",
]


def reference_path(name: str) -> Path:
    path = REFERENCE / name
    if not path.exists():
        missing_shared(f"{path} is not here: the reference data lives in ../shared beside the checkout")
    return path


def load_golden(name: str):
    """(npz, create_model flags) of a golden file."""
    golden = np.load(reference_path(name))
    flags = json.loads(str(golden["flags"]))
    return golden, {k: flags[k] for k in MODEL_FLAG_NAMES}


def load_manifest(config: str) -> dict:
    return json.loads(reference_path(f"adm_state_dict_{config}.json").read_text())
