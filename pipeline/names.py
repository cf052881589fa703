"""Names that become folder names (datasets, splits, backbone ids): checked before any path is built from them.

A dataset named ``../../x`` in the manifest, or ``--split /tmp`` on the command line, would put a
cache, a checkpoint or a sweep table outside ``--cache-dir`` or the results folder: ``check_name``
refuses such a name in one line that shows the allowed form, wherever a name enters (manifest load,
command-line options, ``get_dataset``).
"""

from __future__ import annotations

import re

from pipeline.errors import BadNameError

__all__ = ["NAME_FORM", "check_name"]

NAME_FORM = "letters, digits, '.', '_', '+' and '-', starting with a letter or digit, at most 128 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_name(value: object, what: str) -> str:
    """``value`` unchanged when it is a safe single folder name, else ``BadNameError``.

    Args:
        value: the name (anything: a YAML key may be a number or None).
        what: what it names, for the message (``dataset``, ``split``, ``backbone id``).

    Raises:
        BadNameError: empty, ``.``/``..``, a path (``/``, ``\\``), absolute, control or other characters.
    """
    if isinstance(value, str) and _NAME.fullmatch(value):
        return value
    raise BadNameError(f"{what} name {_shown(value)} cannot be a folder name: use {NAME_FORM}")


def _shown(value: object) -> str:
    """The name as one printable line (control characters escaped), cut to 60 characters."""
    text = ascii(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
