"""Fixtures every test package shares: the ../shared folder and CIFAR-10 unpacked once per machine.

A test that reads real CIFAR-10 (through ``cifar10_root``) is marked ``e2e`` here, so ``make test-fast``
(``-m "not e2e"``) leaves every one of them out. Under ``CI=true`` missing shared data fails the test
instead of skipping it: CI runs with ``../shared`` beside the clone, so a skip there would hide a fault.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.archives import ensure_unpacked
from pipeline.manifest import default_data_root, default_shared_dir
from tests.shared_data import missing_shared

CIFAR10_ARCHIVE = "data/cifar10-jpg.tar.gz"
CIFAR10_FOLDER = "cifar10-jpg"


def pytest_collection_modifyitems(items) -> None:
    """Every test that reads real CIFAR-10 images carries the ``e2e`` mark."""
    for item in items:
        if "cifar10_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (or ``$DIFFREP_SHARED``); skips the test when it is absent."""
    path = default_shared_dir()
    if not path.is_dir():
        missing_shared(f"{path} is not here: the shared data lives in ../shared beside the checkout (or set DIFFREP_SHARED)")
    return path


@pytest.fixture(scope="session")
def cifar10_root(shared_dir: Path) -> Path:
    """The unpacked ``cifar10-jpg`` folder (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``).

    Unpacked from ``../shared/data/cifar10-jpg.tar.gz`` into ``$DIFFREP_DATA`` (default
    ``~/.cache/diffrep/data``) the first time on a machine; later runs find it there.
    """
    archive = shared_dir / CIFAR10_ARCHIVE
    if not archive.is_file():
        missing_shared(f"{archive} is not here: the CIFAR-10 images live in ../shared/data beside the checkout")
    return ensure_unpacked(archive, default_data_root(), CIFAR10_FOLDER)
