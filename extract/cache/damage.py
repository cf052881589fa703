"""Damaged cache metadata put in one line: which ``zarr.json`` does not parse and what to do about it (plus the one-line helpers for errors)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from extract.errors import CacheError

__all__ = ["shorten_error", "list_numbers", "explain_bad_metadata"]


def shorten_error(exc: BaseException) -> str:
    """The exception's text on one line, at most 120 characters (its type when it has none)."""
    text = " ".join(str(exc).split())
    return (text if len(text) <= 120 else text[:117] + "...") or type(exc).__name__


def list_numbers(items: Iterable[int], limit: int = 8) -> str:
    """``3, 5, 9`` (and ``... (+12 more)`` past ``limit``)."""
    items = sorted(int(i) for i in items)
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _metadata_problem(document: Any) -> str | None:
    if not isinstance(document, dict):
        return "not a JSON object"
    if document.get("zarr_format") != 3 or document.get("node_type") not in ("group", "array"):
        return "no zarr_format 3 / node_type"
    return None


def _find_bad_metadata(path: str) -> tuple[str, str] | None:
    """(relative folder, why) of the first zarr.json under a cache that does not parse, skipping chunk folders."""
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not (d == "c" and "zarr.json" in files))
        if "zarr.json" not in files:
            continue
        try:
            with open(os.path.join(folder, "zarr.json"), "rb") as handle:
                problem = _metadata_problem(json.loads(handle.read() or b"null"))
        except (ValueError, UnicodeDecodeError) as exc:
            problem = f"not JSON: {shorten_error(exc)}"
        if problem:
            return os.path.relpath(folder, path), problem
    return None


def _metadata_fix(relative: str) -> str:
    """What to do about a damaged zarr.json, by the node it describes."""
    parts = relative.replace(os.sep, "/").split("/")
    if relative == os.curdir:
        return "it holds the cache's settings and cannot be rebuilt: restore it from a backup or extract into a new --cache-dir"
    if re.fullmatch(r"b\d+/t\d+(_flip)?", "/".join(parts)) or (parts[0] == "done" and len(parts) == 3):
        array = "/".join(parts[-2:])
        return (f"delete the folders {array} and done/{array} of the cache and run the same diffrep extract "
                f"command again: it writes that array again")
    if parts[0] == "index" and len(parts) == 2:
        return "the image index cannot be rebuilt in place: extract into a new --cache-dir"
    return 'replace its content with {"zarr_format": 3, "node_type": "group", "attributes": {}}'


@contextmanager
def explain_bad_metadata(path: str) -> Iterator[None]:
    """Turn Zarr's errors about unreadable metadata under ``path`` into one CacheError that names the file and the fix.

    Other errors (and ValueErrors or TypeErrors while every ``zarr.json`` parses) pass through unchanged.
    """
    try:
        yield
    except (ValueError, TypeError) as exc:
        found = None if isinstance(exc, CacheError) else _find_bad_metadata(path)
        if found is None:
            raise
        relative, why = found
        where = os.path.join(path, "zarr.json" if relative == os.curdir else os.path.join(relative, "zarr.json"))
        raise CacheError(f"cache metadata {where} is damaged ({why}): {_metadata_fix(relative)}") from exc
