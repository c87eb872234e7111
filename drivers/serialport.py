"""Serial devices for the asyncio loop, and what every serial driver shares.

pyserial opens and configures the port (baud rate, raw mode, an exclusive lock so that two agents
never share a till's line); after that the file descriptor is watched by the event loop and read
with os.read, which behaves the same on a USB adapter, a real UART and a pty. A device that
disappears (unplugged, the other end of a pty closed) raises `LinkLost`; the owner then opens it
again, with backoff.

Two ways to drive a `SerialLink`:
- awaiting: `await open()` (retries with backoff, reports health), `await read()`,
  `await write(data, timeout)`. The POS and scanner drivers do this.
- from loop callbacks: `open_once()`, `fileno()` for `loop.add_reader`/`add_writer`,
  `read_nowait()` and `write_nowait(data)` (a partial, non-blocking write: it returns what the
  device took). The receipt tap does this, so that a byte read from the POS is written to the
  printer in the same callback; it reports health itself.

Also here: `describe_error` (the error text of logs and health), `device_node` and
`SerialLink.moved()` (a by-id path that now leads to another device node), `LIVENESS_S`, and
`CommitQueue`, the ordered, retrying commit of a driver's events.

Decision: a port is opened on the loop thread, never in a worker thread. pyserial opens with
O_NONBLOCK, so the open does not wait for the device; a thread could outlive a cancel and keep the
exclusive lock on the port.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import termios
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from agent.core.backoff import Backoff
from agent.core.envelope import EnvelopeError, Event
from agent.sink import BufferUnavailable, DeviceHealth, EventSink

log = logging.getLogger(__name__)

READ_SIZE = 65536
LIVENESS_S = 1.0  # how often an idle port checks that its path still leads to the open device
COMMIT_BATCH = 500


class LinkLost(OSError):
    """The device went away (or was never there); open it again."""


def describe_error(exc: BaseException) -> str:
    """A short error text for logs and health (no Python noise)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def device_node(path: str) -> tuple[int, int] | None:
    """The device node `path` leads to (symlinks followed), or None when it leads nowhere."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_rdev, st.st_ino)


def _open_serial(port: str, baudrate: int) -> Any:
    import serial  # pyserial; imported here so that pure tests never need it

    try:
        return serial.Serial(port, baudrate, timeout=None, exclusive=True)
    except serial.SerialException as exc:
        if "exclusively lock" in str(exc):
            reason = "in use by another process"
        else:  # pyserial wraps the OSError that says why ("No such file or directory")
            reason = describe_error(exc.__context__ if isinstance(exc.__context__, OSError) else exc)
        raise LinkLost(getattr(exc, "errno", None) or errno.EIO, reason) from None
    except (OSError, ValueError) as exc:
        raise LinkLost(errno.EIO, describe_error(exc)) from None


class SerialLink:
    """One serial device, opened raw (8N1, no flow control) and non-blocking.

    `kind` and `name` are what health is reported under (`health.report(kind, name, up, error)`)
    by `open()`, `read()` and `write()`; the `*_once`/`*_nowait` methods report nothing and
    leave the reaction to their caller.
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
        self.node: tuple[int, int] | None = None  # the device node `port` led to when it was opened
        self.opens = 0  # how many times the device was opened (a reopen means a fresh line)

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def fileno(self) -> int:
        """The open device's file descriptor (for `loop.add_reader`/`add_writer`)."""
        return self._require()

    def moved(self) -> bool:
        """True when `port` now leads to another device node than the one open (or to none):
        udev moved a by-id link to a new node while the old one stayed quiet."""
        return device_node(self.port) != self.node

    def open_once(self) -> None:
        """Open the device now, once; raises LinkLost saying why it cannot be opened."""
        self.close()
        ser = self._opener(self.port, self.baudrate)
        try:
            fd = ser.fileno()
            attrs = termios.tcgetattr(fd)
            # VMIN=1: with O_NONBLOCK an empty read is EAGAIN, and a read of b"" means hang-up
            # (pyserial leaves VMIN=0, where both look the same)
            attrs[6][termios.VMIN] = 1
            attrs[6][termios.VTIME] = 0
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
            os.set_blocking(fd, False)
        except (OSError, termios.error) as exc:
            ser.close()
            raise LinkLost(getattr(exc, "errno", None) or errno.EIO, describe_error(exc)) from None
        self._serial = ser
        self._fd = fd
        self.node = device_node(self.port)
        self.opens += 1

    async def open(self) -> None:
        """Open the device, retrying with backoff (reported as down) until it opens."""
        while True:
            try:
                # on the loop thread (see the module's docstring)
                self.open_once()
            except OSError as exc:
                delay = self._backoff.next_delay()
                message = describe_error(exc)
                self._health.report(self.kind, self.name, False, f"cannot open {self.port}: {message}")
                log.warning(
                    "%s:%s: cannot open %s: %s; retrying in %.1f s",
                    self.kind,
                    self.name,
                    self.port,
                    message,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            self._health.report(self.kind, self.name, True)
            log.info("%s:%s: opened %s at %d baud", self.kind, self.name, self.port, self.baudrate)
            return

    def read_nowait(self) -> bytes:
        """What the device has sent (b"" when nothing yet). Raises LinkLost when it went away."""
        fd = self._require()
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError as exc:  # EIO: the other end of a pty closed; ENXIO/ENODEV: USB unplugged
            raise LinkLost(exc.errno or errno.EIO, describe_error(exc)) from None
        if not data:
            raise LinkLost(errno.EIO, "device hung up")
        return data

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the device takes now, without waiting; how many bytes it took (maybe 0).

        Raises LinkLost when the device went away.
        """
        fd = self._require()
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise LinkLost(exc.errno or errno.EIO, describe_error(exc)) from None

    async def read(self) -> bytes:
        """The next bytes the device sent (at least one). Raises LinkLost when it went away."""
        while True:
            try:
                data = self.read_nowait()
            except LinkLost as exc:
                self._lost(describe_error(exc))
            if data:
                return data
            await self._wait(self._fd, writing=False, timeout=None)

    async def write(self, data: bytes, timeout: float | None = None) -> bool:
        """Write all of `data`; False if the device would not take it within `timeout` seconds.

        Raises LinkLost when the device went away.
        """
        view = memoryview(data)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while view:
            try:
                sent = self.write_nowait(view)
            except LinkLost as exc:
                self._lost(describe_error(exc))
            if sent:
                view = view[sent:]
                continue
            left = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if left is not None and left <= 0:
                return False
            if not await self._wait(self._fd, writing=True, timeout=left):
                return False
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

    def _lost(self, reason: str) -> NoReturn:
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

        add, remove = (
            (loop.add_writer, loop.remove_writer) if writing else (loop.add_reader, loop.remove_reader)
        )
        add(fd, wake)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: 3.11's can swallow a cancel
                await ready
            return True
        except TimeoutError:
            return False
        finally:
            remove(fd)


class CommitQueue:
    """Events waiting for a durable commit, committed in order by one task, retried on BufferFull.

    `put` never blocks; `run` commits whatever is waiting as one commit (up to `COMMIT_BATCH`),
    so a burst costs one fsync. `on_state(ok, error)` is called when the buffer refuses events and
    when it takes them again.
    """

    def __init__(
        self,
        sink: EventSink,
        label: str,
        on_state: Callable[[bool, str | None], None],
        pending_max: int = 10_000,
        retry_max_s: float = 5.0,
    ) -> None:
        self.sink = sink
        self.label = label
        self.on_state = on_state
        self.pending_max = pending_max
        self.retry_max_s = retry_max_s
        self.pending: collections.deque[Event] = collections.deque()
        self.committed = 0
        self.dropped = 0
        self._wakeup = asyncio.Event()
        self._refused = False

    def put(self, event: Event) -> bool:
        """Queue an event; False (and an error log line) when the queue is full and it is dropped."""
        if len(self.pending) >= self.pending_max:
            self.dropped += 1
            log.error(
                "%s: %s dropped: %d events already wait for the buffer (dropped so far: %d)",
                self.label,
                event.type,
                len(self.pending),
                self.dropped,
            )
            self.on_state(False, f"buffer full: {self.dropped} events dropped")
            return False
        self.pending.append(event)
        self._wakeup.set()
        return True

    async def run(self) -> None:
        """Commit until cancelled."""
        backoff = Backoff(base=0.05, cap=self.retry_max_s)
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.pending:
                batch = [self.pending[i] for i in range(min(len(self.pending), COMMIT_BATCH))]
                try:
                    await self.sink.commit(batch)
                except BufferUnavailable as exc:
                    self._refuse(f"buffer full ({exc}): {len(self.pending)} events waiting")
                    await asyncio.sleep(backoff.next_delay())
                    continue
                except EnvelopeError:
                    for _ in range(await self._commit_one_by_one(batch)):
                        self.pending.popleft()
                    continue
                except Exception as exc:  # a broken buffer must not end the driver; keep the events
                    self._refuse(f"commit failed ({describe_error(exc)}): {len(self.pending)} events waiting")
                    await asyncio.sleep(backoff.next_delay())
                    continue
                for _ in batch:
                    self.pending.popleft()
                self.committed += len(batch)
                backoff.reset()
                if self._refused:
                    self._refused = False
                    log.warning("%s: buffer takes events again; %d were waiting", self.label, len(batch))
                    self.on_state(True, None)

    async def _commit_one_by_one(self, batch: list[Event]) -> int:
        """A batch holding an event that cannot be encoded: commit the others, drop that one loudly.

        Returns how many of the batch's events are done with (committed or dropped), in order;
        BufferFull stops early and leaves the rest waiting.
        """
        taken = 0
        for event in batch:
            try:
                await self.sink.commit([event])
                self.committed += 1
            except EnvelopeError as exc:
                self.dropped += 1
                log.error("%s: %s dropped: it cannot be encoded: %s", self.label, event.type, exc)
            except BufferUnavailable:
                break
            taken += 1
        return taken

    def _refuse(self, error: str) -> None:
        if not self._refused:
            log.error("%s: %s; retrying", self.label, error)
        self._refused = True
        self.on_state(False, error)

    async def close(self, timeout: float = 2.0) -> None:
        """One last commit of what is waiting; what cannot be kept is named in the log."""
        if not self.pending:
            return
        batch: Sequence[Event] = list(self.pending)
        try:
            async with asyncio.timeout(timeout):
                await self.sink.commit(batch)
        except (Exception, asyncio.CancelledError) as exc:
            log.error(
                "%s: stopping with %d events not committed (%s): %s",
                self.label,
                len(batch),
                describe_error(exc) or type(exc).__name__,
                "; ".join(f"{e.type} {e.ts}" for e in list(batch)[:5]),
            )
            return
        self.pending.clear()
        self.committed += len(batch)
