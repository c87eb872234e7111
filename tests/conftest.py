from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, its own for this test."""
    b = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield b
    finally:
        b.stop()
