"""Advice that is a command: the ``diffrep extract`` line that does exactly the missing work of one cache.

A reader that finds an array absent, unfinished or with lost shards knows only the cache; the command
that fills it must repeat every setting the cache was written with (configuration, weights, split,
subset, shard size, pool, noise, views, precision, row order, batch size and threads, where the images
were), or it plans
another, often far bigger, job. ``extract_command_for`` builds that line from the cache's
``CacheSpec`` and its last run record; ``advised`` turns a structured ``CacheIncompleteError`` into
its one line with that command (the CLI calls it on every error it prints).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from extract.cache import CacheSpec
from extract.errors import CacheIncompleteError

__all__ = ["extract_command_for", "advised"]


def extract_command_for(spec: CacheSpec, blocks: Iterable[int], timesteps: Iterable[int], cache_dir: str | os.PathLike,
                        runs: Sequence[Mapping[str, Any]] = ()) -> str:
    """The ``diffrep extract`` command that writes ``blocks`` x ``timesteps`` into the cache of ``spec``.

    Args:
        spec: the cache's spec (everything that changes its numbers).
        blocks, timesteps: the arrays to write (every block at every timestep, as extract does).
        cache_dir: the cache root (``--cache-dir``), the folder above ``<dataset>/<split>/<backbone id>``.
        runs: the cache's run records (``FeatureCache.runs``): the last one that recorded the checkpoint
            path and image folders gives them (else the checkpoint is a placeholder naming its sha256), the
            last one gives the batch size, torch threads and decode device the numbers depend on.
    """
    recorded = next((run for run in reversed(list(runs)) if "checkpoint" in run), {})
    words = ["diffrep", "extract", "--dataset", spec.dataset, "--split", spec.split, "--config", spec.config_name]
    if spec.checkpoint_sha256:
        path = recorded.get("checkpoint")
        words += ["--checkpoint", path if path else f"<PATH of the .pt whose sha256 starts {spec.checkpoint_sha256[:12]}>"]
    else:
        words += ["--weight-seed", str(spec.weight_seed or 0)]
    for part in spec.subset.split(","):
        name, _, value = part.partition("=")
        if name in ("per_class", "limit"):
            words += [f"--{name.replace('_', '-')}", value]
    words += ["--blocks", _numbers(blocks), "--timesteps", _numbers(timesteps), "--pool", str(spec.pool or "none"),
              "--shard-size", str(spec.shard_size), "--noise-seed", str(spec.noise_seed), "--precision", spec.precision]
    if spec.row_order_seed is not None:
        words += ["--order-seed", str(spec.row_order_seed)]
    if spec.flip:
        words.append("--flip")
    if spec.noise_draws > 1:
        words += ["--noise-draws", str(spec.noise_draws)]
    if spec.family != "adm":  # a latent family's image size is a choice (SD: 512 or 256)
        words += ["--image-size", str(spec.image_size)]
    for key, flag in (("data_root", "--data-root"), ("split_dir", "--split-dir")):
        if recorded.get(key):
            words += [flag, str(recorded[key])]
    computed = next((run for run in reversed(list(runs)) if "batch_size" in run), {})
    for key, flag in (("batch_size", "--batch-size"), ("threads", "--threads")):  # CPU results depend on them
        if computed.get(key):
            words += [flag, str(computed[key])]
    if computed.get("decode_device", "cpu") != "cpu":
        words += ["--decode-device", str(computed["decode_device"])]
    words += ["--cache-dir", os.fspath(cache_dir)]
    return " ".join(word if word.startswith("<") else shlex.quote(word) for word in words)


def advised(exc: BaseException) -> str:
    """The error's one line; for a cache that lacks arrays or shards, what is missing and the command that adds it."""
    if isinstance(exc, CacheIncompleteError) and exc.spec is not None and exc.arrays:
        blocks = sorted({b for b, _ in exc.arrays})
        timesteps = sorted({t for _, t in exc.arrays})
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(exc.path))))
        return f"{exc.problem}: run {extract_command_for(exc.spec, blocks, timesteps, root, exc.runs)}"
    return str(exc)


def _numbers(values: Iterable[int]) -> str:
    return ",".join(str(int(v)) for v in sorted(set(values)))
