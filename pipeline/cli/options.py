"""Command-line value types and the options several commands share, each defined once."""

from __future__ import annotations

import functools
import math
import os

import click

__all__ = [
    "IntList", "BlockList", "TimestepList", "PoolList", "FloatList", "FolderName", "RamCapGb", "int_tuple",
    "config_option", "checkpoint_option", "image_size_option", "dataset_option", "cache_dir_option", "device_option",
    "default_cache_dir", "cache_options", "protocol_options", "SOLVER_CHOICES", "L2_DEFAULT",
]

# Kept literal so that `--help` does not import torch; tests hold them equal to the library's.
SOLVER_CHOICES = ("lbfgs", "sgd", "adam")  # pipeline.evaluate.SOLVERS
L2_DEFAULT = "1e-4,1e-3,1e-2"  # probe.logistic.DEFAULT_L2_GRID


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


class FolderName(click.ParamType):
    """A dataset, split or backbone name, which becomes one folder name (``pipeline.names.check_name``);
    ``many`` reads a comma-separated list of them."""

    name = "name"

    def __init__(self, what: str, many: bool = False):
        self.what, self.many = what, many

    def convert(self, value, param, ctx):
        from pipeline.errors import BadNameError
        from pipeline.names import check_name

        if isinstance(value, (list, tuple)):
            return list(value)
        names = [part.strip() for part in str(value).split(",") if part.strip()] if self.many else [value]
        try:
            names = [check_name(name, self.what) for name in names]
        except BadNameError as exc:
            self.fail(str(exc), param, ctx)
        if self.many and not names:
            self.fail(f"give at least one {self.what} name, e.g. train,test", param, ctx)
        return names if self.many else names[0]


class RamCapGb(click.ParamType):
    """A RAM cap in GiB: a positive, finite number (``nan``, ``inf``, 0 and negatives are refused)."""

    name = "gib"

    def convert(self, value, param, ctx):
        try:
            cap = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of GiB, e.g. 16", param, ctx)
        if not math.isfinite(cap) or cap <= 0:
            self.fail(f"{value} is not a positive, finite number of GiB: pass e.g. 16, or leave it out for half "
                      f"the RAM", param, ctx)
        return cap


def default_cache_dir() -> str:
    return os.environ.get("DIFFREP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffrep", "features"))


def config_option(default: str = "256x256_uncond"):
    return click.option(
        "--config", "config_name", default=default, show_default=True,
        help="Named backbone configuration (see `diffrep info --list`).",
    )


def checkpoint_option():
    return click.option(
        "--checkpoint", type=click.Path(), default=None, callback=_absolute_if_present,
        help="Weights for --config: an official guided-diffusion .pt file, or for Stable Diffusion a local diffusers "
             "folder or .safetensors file; without it the weights are random (for tests and benchmarks).",
    )


def _absolute_if_present(_ctx, _param, value: str | None) -> str | None:
    """An existing path made absolute (workers elsewhere must not depend on our cwd); anything else as typed,
    so the family can say what it is (a hub name, a missing file)."""
    return os.path.abspath(value) if value and os.path.exists(value) else value


def image_size_option():
    return click.option(
        "--image-size", "image_size", type=click.IntRange(min=8), default=None,
        help="Model input side in pixels (Stable Diffusion: 512 or 256; default: the configuration's own).",
    )


def dataset_option(default: str | None = None):
    return click.option(
        "--dataset", type=FolderName("dataset"), default=default, required=default is None,
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


def int_tuple(ctx, param, value):
    """Parse ``2048,1024`` into (2048, 1024), order kept (hidden and channel sizes)."""
    if value is None:
        return None
    try:
        sizes = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 2048,1024") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: give positive sizes, e.g. 2048,1024")
    return sizes


def cache_options(fn):
    """--dataset, --cache-dir, --config, --backbone-id, --train-split/--test-split, --allow-same-split, --results,
    --ram-cap-gb: gathered into one ``CacheSelection`` passed as ``cache``."""
    decorators = [
        dataset_option(),
        cache_dir_option(),
        config_option(),
        click.option("--backbone-id", type=FolderName("backbone id"), default=None,
                     help="Cache folder of the backbone (e.g. 256x256_uncond-1a2b3c4d5e6f); default: the one "
                          "cache of --config for this dataset."),
        click.option("--train-split", type=FolderName("split"), default="train", show_default=True,
                     help="Split to train on (or the kNN memory)."),
        click.option("--test-split", type=FolderName("split"), default="test", show_default=True, help="Split to score."),
        click.option("--allow-same-split", is_flag=True, help="Allow --test-split equal to --train-split (scores on training rows)."),
        click.option("--results", "results_path", type=click.Path(dir_okay=False), default=None,
                     help="Results table to append to [default: $DIFFREP_RESULTS or results/results.parquet]."),
        click.option("--ram-cap-gb", type=RamCapGb(), default=None,
                     help="Most RAM one cached array may take when read whole (default: the cache's, half the RAM)."),
    ]

    @functools.wraps(fn)
    def wrapper(dataset, cache_dir, config_name, backbone_id, train_split, test_split, allow_same_split, results_path,
                ram_cap_gb, **options):
        from pipeline.evaluate import CacheSelection

        cache = CacheSelection(dataset=dataset, cache_dir=cache_dir, config_name=config_name, backbone_id=backbone_id,
                               train_split=train_split, test_split=test_split, allow_same_split=allow_same_split,
                               results_path=results_path, ram_cap_gb=ram_cap_gb)
        return fn(cache=cache, **options)

    return functools.reduce(lambda f, d: d(f), reversed(decorators), wrapper)


def protocol_options(fn):
    """--solver, --lr, --l2, --heldout-fraction, --epochs, --batch-size, --seed: how a linear probe is fitted."""
    decorators = [
        click.option("--solver", type=click.Choice(SOLVER_CHOICES), default=None,
                     help="lbfgs: the converged probe (standardised features, logistic regression to its optimum, "
                          "L2 chosen on held-out rows; linear head only, the default for it). sgd / adam: the "
                          "paper's protocol (28 epochs, StepLR 7); the default for the other heads."),
        click.option("--lr", type=FloatList(), default=None,
                     help="Learning rate(s) of sgd/adam; several (e.g. 1e-3,1e-2,1e-1) train in one pass and the best "
                          "on the held-out rows is scored [default: 1e-2 linear/MLP/CNN, 5e-2 attention]."),
        click.option("--l2", type=FloatList(allow_zero=True), default=L2_DEFAULT,
                     show_default=True, help="L2 weights the converged probe chooses from on the held-out rows."),
        click.option("--heldout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
                     show_default=True, help="Share of every class held out of the train split to choose L2 / lr."),
        click.option("--epochs", type=click.IntRange(min=1), default=28, show_default=True,
                     help="Epochs of sgd/adam (StepLR divides the lr by 10 every 7)."),
        click.option("--label-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Train on this share of every class's labelled images (e.g. 0.01, 0.1), drawn with --seed."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per step (sgd/adam)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the held-out rows, the heads' initialisation and the batch order."),
        click.option("--views/--view-0", "views", default=True, show_default=True,
                     help="sgd/adam: train on every view the cache stores (extract --noise-draws K, --flip), one per "
                          "image per epoch, seeded; scoring always reads view 0."),
    ]

    @functools.wraps(fn)
    def wrapper(solver, lr, l2, heldout_fraction, epochs, label_fraction, batch_size, seed, views, **options):
        from pipeline.evaluate import FitProtocol

        protocol = FitProtocol(solver=solver, lr=lr, l2=l2, heldout_fraction=heldout_fraction, epochs=epochs,
                               label_fraction=label_fraction, batch_size=batch_size, seed=seed, views=views)
        return fn(protocol=protocol, **options)

    return functools.reduce(lambda f, d: d(f), reversed(decorators), wrapper)
