"""What a test does when a piece of ``../shared`` is missing: skip on a developer's machine, fail under CI."""

from __future__ import annotations

import os

import pytest
def missing_shared(message: str) -> None:
    """Skip the test for a missing piece of ``../shared``, or fail it under CI, where the piece must be there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: CI must run with ../shared beside the clone)", pytrace=False)
    pytest.skip(message)
