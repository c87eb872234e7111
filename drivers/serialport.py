"""A serial device for the asyncio loop: opened with pyserial, read and written without threads.

pyserial opens and configures the port (baud rate, raw mode, an exclusive lock so that two agents
never share a till's line); after that the file descriptor is watched by the event loop and read
with os.read, which behaves the same on a USB adapter, a real UART and a pty. A device that
disappears (unplugged, the other end of a pty closed) raises `LinkLost` from `read`/`write`; the
owner then calls `open()` again, which retries with backoff and reports health.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import termios
from collections.abc import Callable
from typing import Any

from agent.core.backoff import Backoff
from agent.sink import DeviceHealth

log = logging.getLogger(__name__)

READ_SIZE = 65536


class LinkLost(OSError):
    """The device went away (or was never there); `open()` again."""


def _open_serial(port: str, baudrate: int) -> Any:
    import serial  # pyserial; imported here so that pure tests never need it

    try:
        return serial.Serial(port, baudrate, timeout=None, exclusive=True)
    except serial.SerialException as exc:
        text = str(exc)
        if "exclusively lock" in text:
            text = f"{port} is in use by another process"
        raise LinkLost(getattr(exc, "errno", None) or errno.EIO, text) from None
    except (OSError, ValueError) as exc:
        raise LinkLost(errno.EIO, f"{port}: {exc}") from None


class SerialLink:
    """One serial device: `await open()`, then `await read()` / `await write(data)`, `close()`.

    `kind` and `name` are what health is reported under (`health.report(kind, name, up, error)`).
    """

    def __init__(
        self,
        port: str,
        baudrate: int,
        *,
        kind: str,
        name: str,
        health: DeviceHealth,
        backoff: Backoff | None = None,
        opener: Callable[[str, int], Any] = _open_serial,
    ) -> None:
        self.port = port
        self.baudrate = baudrate
        self.kind = kind
        self.name = name
        self._health = health
        self._backoff = backoff or Backoff(base=0.2, cap=5.0)
        self._opener = opener
        self._serial: Any = None
        self._fd = -1
        self.opens = 0  # how many times the device was opened (a reopen means a fresh line)

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    async def open(self) -> None:
        """Open the device, retrying with backoff (reported as down) until it opens."""
        self.close()
        while True:
            try:
                # on the loop thread: pyserial opens with O_NONBLOCK, so this does not wait for
                # the device; a thread here could outlive a cancel and leak the exclusive lock
                ser = self._opener(self.port, self.baudrate)
                fd = ser.fileno()
                attrs = termios.tcgetattr(fd)
                # VMIN=1: with O_NONBLOCK an empty read is EAGAIN, and a read of b"" means hang-up
                # (pyserial leaves VMIN=0, where both look the same)
                attrs[6][termios.VMIN] = 1
                attrs[6][termios.VTIME] = 0
                termios.tcsetattr(fd, termios.TCSANOW, attrs)
                os.set_blocking(fd, False)
            except (LinkLost, OSError, termios.error) as exc:
                delay = self._backoff.next_delay()
                message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                self._health.report(self.kind, self.name, False, message)
                log.warning("%s:%s: cannot open %s: %s; retrying in %.1f s",
                            self.kind, self.name, self.port, message, delay)
                await asyncio.sleep(delay)
                continue
            self._serial = ser
            self._fd = fd
            self.opens += 1
            self._backoff.reset()
            self._health.report(self.kind, self.name, True)
            log.info("%s:%s: opened %s at %d baud", self.kind, self.name, self.port, self.baudrate)
            return

    async def read(self) -> bytes:
        """The next bytes the device sent (at least one). Raises LinkLost when it went away."""
        while True:
            fd = self._require()
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                await self._wait(fd, writing=False, timeout=None)
                continue
            except OSError as exc:  # EIO: the other end of a pty closed; ENXIO/ENODEV: USB unplugged
                self._lost(exc.strerror or str(exc))
            if not data:
                self._lost("device hung up")
            return data

    async def write(self, data: bytes, timeout: float | None = None) -> bool:
        """Write all of `data`; False if the device would not take it within `timeout` seconds.

        Raises LinkLost when the device went away.
        """
        view = memoryview(data)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while view:
            fd = self._require()
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if left is not None and left <= 0:
                    return False
                if not await self._wait(fd, writing=True, timeout=left):
                    return False
                continue
            except OSError as exc:
                self._lost(exc.strerror or str(exc))
            view = view[sent:]
        return True

    def close(self) -> None:
        """Close the device (idempotent)."""
        if self._serial is not None:
            try:
                self._serial.close()
            except Exception:  # closing a vanished device may fail; it is closed either way
                pass
        self._serial = None
        self._fd = -1

    def _require(self) -> int:
        if self._fd < 0:
            raise LinkLost(errno.EBADF, f"{self.port} is not open")
        return self._fd

    def _lost(self, reason: str) -> None:
        self.close()
        self._health.report(self.kind, self.name, False, reason)
        log.warning("%s:%s: lost %s: %s", self.kind, self.name, self.port, reason)
        raise LinkLost(errno.EIO, reason)

    async def _wait(self, fd: int, *, writing: bool, timeout: float | None) -> bool:
        """Wait until `fd` is readable (or writable); False on timeout."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        add, remove = (loop.add_writer, loop.remove_writer) if writing else (loop.add_reader, loop.remove_reader)
        add(fd, wake)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: 3.11's can swallow a cancel
                await ready
            return True
        except TimeoutError:
            return False
        finally:
            remove(fd)
