"""The registry of backbone families (family name -> factory), and ``create_backbone``, which goes through it.

A new family is one module with a :class:`~extract.backbone.family.BackboneFamily` subclass plus
one entry in ``FAMILIES``; configuration names are unique across families.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from extract.backbone.adm_family import ADMFamily
from extract.backbone.family import BackboneFamily
from extract.backbone.sd_family import SDFamily
from extract.errors import ConfigError

__all__ = ["FAMILIES", "get_family", "family_of", "create_backbone"]

#: family name -> factory of its :class:`BackboneFamily`
FAMILIES: dict[str, Callable[[], BackboneFamily]] = {
    "adm": ADMFamily,
    "sd": SDFamily,
}


def get_family(name: str) -> BackboneFamily:
    """The family registered as ``name``.

    Raises:
        ConfigError: no such family (the message lists the registered ones).
    """
    try:
        return FAMILIES[name]()
    except KeyError:
        raise ConfigError(f"unknown backbone family {name!r}: choose one of {', '.join(FAMILIES)}") from None


def family_of(config_name: str) -> BackboneFamily:
    """The family that names configuration ``config_name``.

    Raises:
        ConfigError: no family has it (the message lists every known configuration).
    """
    families = [factory() for factory in FAMILIES.values()]
    for family in families:
        if config_name in family.config_names():
            return family
    known = [name for family in families for name in family.config_names()]
    raise ConfigError(f"unknown configuration {config_name!r}: choose one of {', '.join(known)}")


def create_backbone(name: str, checkpoint: str | None = None, weight_seed: int | None = None, **overrides: Any) -> nn.Module:
    """Build a named backbone of any family in eval mode (see that family's ``create``).

    Args:
        name: a named configuration. checkpoint: its weights, loaded strictly.
        weight_seed: without a checkpoint, random weights drawn from this seed (None: the family's own init).
        overrides: flags that win over the named ones.

    Raises:
        ConfigError: unknown name or flag. CheckpointError: unreadable or mismatching checkpoint.
    """
    return family_of(name).create(name, checkpoint=checkpoint, weight_seed=weight_seed, **overrides)
