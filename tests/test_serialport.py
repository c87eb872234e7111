"""drivers/serialport.py over real ptys: the non-blocking calls the receipt tap drives from loop callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from agent.health import HealthBoard
from drivers.serialport import LinkLost, SerialLink
from tests.support.ptys import Pty
from tests.support.wait import wait_until


def link(path: str, health: HealthBoard | None = None) -> SerialLink:
    return SerialLink(path, 115200, kind="pos", name="front-1", health=health or HealthBoard())


def test_write_nowait_takes_what_the_device_takes_and_never_waits(pty: Pty) -> None:
    line = link(pty.path)
    line.open_once()
    try:
        data = os.urandom(1 << 20)  # more than a pty holds while nobody reads the other end
        taken = line.write_nowait(data)
        assert 0 < taken < len(data)
        for _ in range(1000):  # the pty may take a little more in further writes, then none
            more = line.write_nowait(data[taken:])
            if more == 0:
                break  # full: 0, not an exception, not a wait
            taken += more
        assert taken < len(data) and line.write_nowait(data[taken:]) == 0
        got = bytearray()

        def drained() -> bool:
            with contextlib.suppress(BlockingIOError):
                got.extend(os.read(pty.master, 65536))
            return len(got) >= taken

        assert wait_until(drained, 10)
        assert got == data[:taken]  # partial, in order, nothing lost or repeated
        assert line.write_nowait(data[taken:]) > 0  # room again
    finally:
        line.close()


def test_read_nowait_is_empty_until_data_then_raises_when_the_device_goes(pty: Pty) -> None:
    line = link(pty.path)
    line.open_once()
    try:
        assert line.read_nowait() == b""
        os.write(pty.master, b"\x1b@hello")
        assert line.read_nowait() == b"\x1b@hello"
        os.close(pty.master)  # the other end hangs up
        with pytest.raises(LinkLost):
            line.read_nowait()
    finally:
        line.close()


def test_open_once_and_moved_follow_the_path(tmp_path: Path) -> None:
    first, second = Pty(), Pty()
    path = tmp_path / "ttyPOS"
    line = link(str(path))
    try:
        with pytest.raises(LinkLost, match="No such file"):
            line.open_once()
        assert not line.is_open and line.opens == 0
        path.symlink_to(first.path)
        line.open_once()
        assert line.is_open and line.opens == 1 and not line.moved()
        path.unlink()
        path.symlink_to(second.path)
        assert line.moved()
    finally:
        line.close()
        first.close()
        second.close()


def test_open_reports_why_it_cannot_open(tmp_path: Path) -> None:
    health = HealthBoard()
    path = tmp_path / "ttyACM0"
    line = link(str(path), health)

    async def main() -> None:
        opening = asyncio.create_task(line.open())
        try:
            async with asyncio.timeout(10):
                while not health.snapshot():
                    await asyncio.sleep(0.01)
        finally:
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)

    asyncio.run(main())
    (state,) = health.snapshot()
    assert state["up"] is False
    assert state["error"] == f"cannot open {path}: No such file or directory"
