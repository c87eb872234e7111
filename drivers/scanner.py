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

The device is read through `drivers.serialport.SerialLink` (pyserial setup, loop-driven reads),
and the reads are committed through `drivers.serialport.CommitQueue`, as the receipt tap's are.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable

from agent.config import ScannerSection
from agent.core.backoff import Backoff
from agent.core.envelope import Event, UtcFormatter
from agent.protocols.scan import ScanFramer, ScanRead, decode_scan
from agent.sink import DeviceHealth, EventSink
from drivers.serialport import LIVENESS_S, CommitQueue, LinkLost, SerialLink

log = logging.getLogger(__name__)


class ScannerDriver:
    """One serial barcode scanner: reads → `scan.read` events, reconnecting when unplugged."""

    def __init__(
        self,
        cfg: ScannerSection,
        sink: EventSink,
        health: DeviceHealth,
        *,
        clock: Callable[[], float] = time.time,
        reopen_max_s: float = 5.0,
        retry_max_s: float = 5.0,
        pending_max: int = 10_000,
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.health = health
        self.clock = clock
        self.source = f"scanner:{cfg.name}"
        self.link = SerialLink(
            cfg.port,
            cfg.baudrate,
            kind="scanner",
            name=cfg.name,
            health=health,
            backoff=Backoff(base=0.1, cap=reopen_max_s),
        )
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
            framer = ScanFramer(self.cfg.terminator)
            try:
                await self._pump(framer)
            except LinkLost:
                pass  # SerialLink logged it and reported the device down
            finally:
                if framer.buffered:
                    log.warning(
                        "%s: a read cut off by the disconnect was not committed (%d bytes)",
                        self.source,
                        len(framer.buffered),
                    )

    async def _pump(self, framer: ScanFramer) -> None:
        read = self.link.read
        while True:
            try:
                async with asyncio.timeout(LIVENESS_S):  # not wait_for: 3.11's can swallow a cancel
                    data = await read()
            except TimeoutError:
                if self.link.moved():
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
        return {
            "aim": None,
            "symbology": None,
            "data": raw.decode("latin-1"),
            "gtin": None,
            "ai": {},
            "valid": False,
            "errors": [f"decode failed: {exc}"],
        }
