"""Official-checkpoint loading: compare a state dict with the model, then load strictly or explain.

A checkpoint either fits the configuration exactly (every key, every shape) and loads with
``strict=True``, or nothing is loaded and one line names the first mismatching keys and shapes
and the flag that most likely differs. The load itself is ``extract.backbone.adm_family.ADMFamily.create``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import stat
from collections.abc import Mapping

import torch
from torch import nn

from extract.errors import CheckpointError

__all__ = ["read_state_dict", "load_tensors", "require_checkpoint_file", "compare_state_dict", "file_sha256",
           "state_dict_layout"]

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "ema")


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    """SHA-256 of a file, read in 16 MiB chunks (a 2.2 GB checkpoint takes a few seconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def require_checkpoint_file(path: str | os.PathLike, flag: str = "--checkpoint") -> None:
    """Refuse, in one line, a checkpoint path that is missing, a folder, or not a regular file (a device, pipe, socket).

    Raises:
        CheckpointError: naming the path and what it is instead.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist: check the path given to {flag}") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror or exc}): check the path given to "
                              f"{flag}") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"checkpoint {path} is a folder: pass the .pt file itself to {flag}")
    if not stat.S_ISREG(mode):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else
                "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise CheckpointError(f"checkpoint {path} is not a regular file ({kind}): pass the .pt file itself to {flag}")


def load_tensors(path: str | os.PathLike, remedy: str, what: str = "checkpoint") -> object:
    """``torch.load`` with ``weights_only=True``: tensors, numbers, strings, lists, tuples and dicts, never code.

    Args:
        path: the file. remedy: what the user should do when it cannot be loaded (ends the one-line error).
        what: how the error names the file (``checkpoint``, ``pretraining checkpoint`` ...).

    Raises:
        CheckpointError: the file holds objects that are not tensors or plain values (named; nothing of
            it is run or loaded), or it is truncated, damaged or of another format.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(f"{what} {path} holds objects that are not tensors or plain values "
                                  f"({found.group(1)}), so it is not loaded (loading it could run code): {remedy}") from None
        raise CheckpointError(f"{what} {path} is not a readable PyTorch file: {_what_file(path)}; {remedy}") from None
    except Exception:  # noqa: BLE001 - torch raises many types for bad files; all mean the same to a user
        raise CheckpointError(f"{what} {path} is not a readable PyTorch file: {_what_file(path)}; {remedy}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pt`` file into a flat ``{key: tensor}`` dict on the CPU.

    Unwraps the usual containers (``state_dict``, ``model``, ``ema``) and a ``module.`` prefix.
    Only tensors are loaded (``weights_only=True``): a checkpoint cannot run code.

    Raises:
        CheckpointError: the file is missing, not a regular file, empty, truncated, holds objects that
            are not tensors, or is not a PyTorch state dict.
    """
    path = os.fspath(path)
    require_checkpoint_file(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): download it again")
    obj = load_tensors(path, "pass the official .pt file (download it again if it was cut short)")
    for key in _CONTAINER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors: pass a guided-diffusion .pt file")
    # Half-precision files become float32: the backbone computes in float32 (autocast on GPUs).
    state = {str(k): v.float() if v.is_floating_point() else v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _what_file(path: str) -> str:
    """What an unreadable checkpoint looks like, in a whole clause (torch's own messages run long)."""
    with open(path, "rb") as handle:
        head = handle.read(256)
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive, as PyTorch writes them, but truncated or damaged"
    if head[:1] == b"\x80":
        return ("it is a pickle that a tensors-only load cannot read (damaged, or not written by torch.save), "
                "so it is not loaded")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "its first bytes are of no format PyTorch writes"
    first = " ".join(text.split())
    return f"it is a text file (starting {first[:40]!r}{'...' if len(first) > 40 else ''})"


def state_dict_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a model's state dict (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _likely_flag(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str:
    """Guess which guided-diffusion flag explains the difference between two layouts."""
    if ("label_emb.weight" in found) != ("label_emb.weight" in expected):
        return "set class_cond=True" if "label_emb.weight" in found else "set class_cond=False"
    if "out.2.weight" in found and "out.2.weight" in expected and found["out.2.weight"][0] != expected["out.2.weight"][0]:
        out = found["out.2.weight"][0]
        if out in (3, 6):
            return f"set learn_sigma={out == 6}"
    if "time_embed.0.weight" in found and found.get("time_embed.0.weight") != expected.get("time_embed.0.weight"):
        width = found["time_embed.0.weight"][1]
        return f"set num_channels={width} (classifier_width for a classifier)"
    count = lambda layout: len({k.split(".")[1] for k in layout if k.startswith("input_blocks.")})  # noqa: E731
    if count(found) != count(expected):
        return f"the checkpoint has {count(found)} input blocks, the model {count(expected)}: check num_res_blocks, channel_mult and image_size"
    attn = lambda layout: {k.rsplit(".qkv.", 1)[0] for k in layout if ".qkv.weight" in k}  # noqa: E731
    if attn(found) != attn(expected):
        return "attention layers sit at other blocks: check attention_resolutions"
    pos_found, pos_expected = found.get("out.2.positional_embedding"), expected.get("out.2.positional_embedding")
    if pos_found and pos_expected and pos_found != pos_expected:
        return "the attention pool was built for another size: check image_size"
    return "check channel_mult, num_head_channels and resblock_updown"


def compare_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], config_name: str = "the model", remedy: str | None = None
) -> str | None:
    """None when ``state`` fits ``model`` exactly, else a one-line explanation of the mismatch.

    The line ends with ``remedy`` when given (``configs`` passes the named configuration the file
    fits), else with the flag that most likely differs.
    """
    expected = state_dict_layout(model)
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected == found:
        return None
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    details = []
    for k in wrong[:2]:
        details.append(f"{k} is {_shape(found[k])}, not {_shape(expected[k])}")
    if missing:
        details.append(f"{len(missing)} key(s) missing, e.g. {missing[0]}")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    if len(wrong) > 2:
        details.append(f"{len(wrong) - 2} more shape mismatch(es)")
    hint = remedy or _likely_flag(expected, found)
    return f"checkpoint does not fit {config_name}: {'; '.join(details)}; {hint}"
