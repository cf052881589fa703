"""Command-line value types and the options several commands share, each defined once."""

from __future__ import annotations

import os

import click

__all__ = [
    "IntList", "BlockList", "TimestepList", "PoolList", "FloatList",
    "config_option", "checkpoint_option", "dataset_option", "cache_dir_option", "device_option",
    "default_cache_dir",
]


class IntList(click.ParamType):
    """A comma-separated list of integers such as ``19,24,30`` (ranges ``20-24`` allowed)."""

    name = "list"
    what = "integers"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value]
        out: list[int] = []
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = (int(v) for v in part.split("-", 1))
                    if lo > hi:
                        self.fail(f"range {part} runs backwards: write {hi}-{lo}", param, ctx)
                    out.extend(range(lo, hi + 1))
                else:
                    out.append(int(part))
            except ValueError:
                self.fail(f"{value!r} is not a comma-separated list of {self.what}, e.g. {self.example}", param, ctx)
        if not out:
            self.fail(f"give at least one of the {self.what}, e.g. {self.example}", param, ctx)
        return sorted(set(out))

    example = "1,2,3"


class BlockList(IntList):
    name = "blocks"
    what = "block numbers"
    example = "19,24,30"


class TimestepList(IntList):
    name = "timesteps"
    what = "timesteps"
    example = "90,150,300"


class PoolList(click.ParamType):
    """Pool sizes: ``16``, ``1,2,4`` or ``none`` (keep full maps, stored as 0).

    ``0`` is refused rather than read as ``none``: it looks like "pool to nothing", not "keep everything".
    """

    name = "pool"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        out = []
        for part in str(value).split(","):
            part = part.strip().lower()
            if part in ("none", "full"):
                out.append(0)
                continue
            try:
                size = int(part)
            except ValueError:
                self.fail(f"{value!r} is not a pool size: give integers like 16 or 1,2,4, or 'none'", param, ctx)
            if size < 1:
                self.fail(f"pool size {size} must be at least 1: write 'none' to keep full maps", param, ctx)
            out.append(size)
        return out


def default_cache_dir() -> str:
    return os.environ.get("DIFFREP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffrep", "features"))


def config_option(default: str = "256x256_uncond"):
    return click.option(
        "--config", "config_name", default=default, show_default=True,
        help="Named backbone configuration (see `diffrep info --list`).",
    )


def checkpoint_option():
    return click.option(
        "--checkpoint", type=click.Path(dir_okay=False, resolve_path=True), default=None,
        help="Official guided-diffusion .pt file for --config; without it the weights are random (for tests and benchmarks).",
    )


def dataset_option(default: str | None = None):
    return click.option(
        "--dataset", default=default, required=default is None,
        help="Dataset name from data_manifest.yaml (e.g. cifar10, imagenet, cub).",
    )


def cache_dir_option():
    return click.option(
        "--cache-dir", type=click.Path(file_okay=False, resolve_path=True), default=default_cache_dir, show_default="$DIFFREP_CACHE or ~/.cache/diffrep/features",
        help="Root of the feature cache.",
    )


def device_option():
    return click.option(
        "--device", default="auto", show_default=True,
        help="Torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...",
    )


class FloatList(click.ParamType):
    """A comma-separated list of positive numbers such as ``1e-3,1e-2,1e-1`` (learning rates, L2 weights)."""

    name = "numbers"

    def __init__(self, allow_zero: bool = False):
        self.allow_zero = allow_zero

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
        try:
            out = tuple(float(part) for part in str(value).split(",") if part.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 1e-3,1e-2", param, ctx)
        if not out:
            self.fail("give at least one number, e.g. 1e-3,1e-2", param, ctx)
        bad = [v for v in out if v < 0 or (v == 0 and not self.allow_zero)]
        if bad:
            self.fail(f"{bad[0]:g} is not {'non-negative' if self.allow_zero else 'positive'}", param, ctx)
        return tuple(dict.fromkeys(out))
