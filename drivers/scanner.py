"""The barcode scanner driver (contract section 5): serial / USB-CDC reads become `scan.read` events.

Each read (framed by `[[scanner]] terminator`, AIM prefix kept) is decoded with `decode_scan` and
committed as `{"type": "scan.read", "source": "scanner:{name}", "data": <decode scan object>}`,
`ts` the moment its terminator arrived. Reads are committed in the order they were scanned.

Unplugging: a USB-CDC scanner that goes away makes reads fail (EIO, or end of file on a hung-up
tty) and its device path disappear; udev's by-id link then points at a new node when it comes
back. The driver closes, reports the device down, and opens the configured path again with
backoff; it also notices a path that now leads to another device node while the old one stays
quiet. A read cut off by the unplug (no terminator yet) is logged and not committed.

No scan is dropped silently:
- BufferFull: the reads wait in memory, in order, and the commit is retried with backoff; the
  health board says "buffer full" meanwhile.
- More than `pending_max` reads waiting (hours of scanning with the buffer full): further reads
  are dropped with an error log line and a health error naming the count.
- An over-long read with no terminator is discarded with a warning (it is line noise, not a
  barcode).
- On shutdown, waiting reads get one last commit attempt; any that fail are named in the log.

Reads that arrive while a commit is in flight are committed together in the next one (in
order), so a burst costs one fsync; a scanner at human pace commits `[event]` each time.

The device is read through `drivers.serialport.SerialLink` (pyserial setup, loop-driven reads).
`CommitQueue`, `device_node` and `describe_error` are also used by the receipt tap.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import time
from collections.abc import Callable, Sequence

from agent.config import ScannerSection
from agent.core.backoff import Backoff
from agent.core.envelope import EnvelopeError, Event, UtcFormatter
from agent.protocols.scan import ScanFramer, ScanRead, decode_scan
from agent.sink import BufferUnavailable, DeviceHealth, EventSink
from drivers.serialport import LinkLost, SerialLink

log = logging.getLogger(__name__)

LIVENESS_S = 1.0  # how often an idle port checks that its path still leads to the open device
COMMIT_BATCH = 500


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


class CommitQueue:
    """Events waiting for a durable commit, committed in order by one task, retried on BufferFull.

    `put` never blocks; `run` commits whatever is waiting as one commit (up to `COMMIT_BATCH`),
    so a burst costs one fsync. `on_state(ok, error)` is called when the buffer refuses events and
    when it takes them again.
    """

    def __init__(self, sink: EventSink, label: str, on_state: Callable[[bool, str | None], None],
                 pending_max: int = 10_000, retry_max_s: float = 5.0) -> None:
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
            log.error("%s: %s dropped: %d events already wait for the buffer (dropped so far: %d)",
                      self.label, event.type, len(self.pending), self.dropped)
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
            log.error("%s: stopping with %d events not committed (%s): %s", self.label, len(batch),
                      describe_error(exc) or type(exc).__name__,
                      "; ".join(f"{e.type} {e.ts}" for e in list(batch)[:5]))
            return
        self.pending.clear()
        self.committed += len(batch)


class ScannerDriver:
    """One serial barcode scanner: reads → `scan.read` events, reconnecting when unplugged."""

    def __init__(self, cfg: ScannerSection, sink: EventSink, health: DeviceHealth, *,
                 clock: Callable[[], float] = time.time, reopen_max_s: float = 5.0,
                 retry_max_s: float = 5.0, pending_max: int = 10_000) -> None:
        self.cfg = cfg
        self.sink = sink
        self.health = health
        self.clock = clock
        self.source = f"scanner:{cfg.name}"
        self.link = SerialLink(cfg.port, cfg.baudrate, kind="scanner", name=cfg.name, health=health,
                               backoff=Backoff(base=0.1, cap=reopen_max_s))
        self.queue = CommitQueue(sink, self.source, self._buffer_state, pending_max, retry_max_s)
        self.reads = 0
        self.bytes_in = 0
        self._fmt = UtcFormatter()

    @property
    def opens(self) -> int:
        """How many times the device was opened (1 + reconnects)."""
        return self.link.opens

    @property
    def up(self) -> bool:
        """True while the device is open."""
        return self.link.is_open

    def _buffer_state(self, ok: bool, error: str | None) -> None:
        self.health.report("scanner", self.cfg.name, self.link.is_open, None if ok else error)

    async def run(self) -> None:
        """Read and commit until cancelled."""
        committer = asyncio.create_task(self.queue.run(), name=f"{self.source}:commit")
        try:
            await self._read_forever()
        finally:
            self.link.close()
            committer.cancel()
            try:
                await committer
            except asyncio.CancelledError:
                pass
            await self.queue.close()

    async def _read_forever(self) -> None:
        while True:
            await self.link.open()
            node = device_node(self.cfg.port)
            framer = ScanFramer(self.cfg.terminator)
            try:
                await self._pump(framer, node)
            except LinkLost:
                pass  # SerialLink logged it and reported the device down
            finally:
                if framer.buffered:
                    log.warning("%s: a read cut off by the disconnect was not committed (%d bytes)",
                                self.source, len(framer.buffered))

    async def _pump(self, framer: ScanFramer, node: tuple[int, int] | None) -> None:
        read = self.link.read
        while True:
            try:
                async with asyncio.timeout(LIVENESS_S):  # not wait_for: 3.11's can swallow a cancel
                    data = await read()
            except TimeoutError:
                if device_node(self.cfg.port) != node:
                    # udev moved the by-id link to a new node while the old one stayed quiet
                    reason = "its path now leads to another device"
                    log.warning("%s: %s: %s; reopening", self.source, self.cfg.port, reason)
                    self.link.close()
                    self.health.report("scanner", self.cfg.name, False, reason)
                    raise LinkLost(errno.ENODEV, reason) from None
                continue
            self._on_bytes(framer, data)

    def _on_bytes(self, framer: ScanFramer, data: bytes) -> None:
        self.bytes_in += len(data)
        reads = framer.feed(data)
        for error in framer.take_errors():
            log.warning("%s: %s", self.source, error)
        if not reads:
            return
        ts = self._fmt.format(int(self.clock() * 1000))
        for raw in reads:
            self.queue.put(Event("scan.read", scan_object(raw), self.source, ts))
        self.reads += len(reads)
        self.health.seen("scanner", self.cfg.name)


def scan_object(raw: bytes) -> ScanRead:
    """`decode_scan(raw)`, or, should the decoder fail, an invalid object that keeps the data."""
    try:
        return decode_scan(raw)
    except Exception as exc:  # a decoder bug must not lose the scan
        log.error("decode_scan failed on a %d-byte read: %s", len(raw), exc)
        return {"aim": None, "symbology": None, "data": raw.decode("latin-1"), "gtin": None,
                "ai": {}, "valid": False, "errors": [f"decode failed: {exc}"]}
