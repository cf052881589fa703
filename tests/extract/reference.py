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


def equal_to_float16_rounding(a, b, floor: float = 2**-4) -> bool:
    """Two float16 arrays (or tensors) at most one float16 step apart at each value's magnitude (at least
    ``floor``'s), as two float32 computations that differ in the last bits (another batch size or thread
    count) are once rounded to float16."""
    a, b = (np.asarray(x.cpu() if hasattr(x, "cpu") else x, dtype=np.float16) for x in (a, b))
    scale = np.maximum(np.maximum(np.abs(a), np.abs(b)), np.float16(floor))
    return bool((np.abs(a.astype(np.float32) - b.astype(np.float32)) <= np.spacing(scale).astype(np.float32)).all())
