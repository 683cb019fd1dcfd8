"""One launch of gloo ranks per world size, shared by every multi-rank test of tests/parallel."""
from __future__ import annotations

import pytest

from tests.parallel.worlds import Worlds


@pytest.fixture(scope="session")
def worlds(shared) -> Worlds:
    return Worlds(shared)
