"""Fixtures every test file may use; the helpers behind them are in tests/support/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from agent.buffer import Outbox
from tests.support.buffer import open_outbox
from tests.support.mosquitto import Mosquitto
from tests.support.ptys import Pty

# Property tests judge what a parser returns, never how fast: no per-example deadline (200 ms by
# default) and no "too slow" health check, which fail on a busy 2-core machine for no fault of the code.
settings.register_profile("store-agent", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("store-agent")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, its own for this test."""
    b = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """A started Outbox on a fresh SQLite file (`tmp_path/buffer.db`), default identity and cap."""
    with open_outbox(tmp_path / "buffer.db") as box:
        yield box


@pytest.fixture
def pty() -> Iterator[Pty]:
    """One real pty: the driver opens `pty.path`, the test plays the device on `pty.master`."""
    p = Pty()
    yield p
    p.close()


@pytest.fixture
def ptys() -> Iterator[tuple[Pty, Pty]]:
    """Two real ptys (a POS line and a printer line, say)."""
    a, b = Pty(), Pty()
    yield a, b
    a.close()
    b.close()
