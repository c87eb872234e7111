"""The receipt tap (contract section 4.2): sits on the printer line, forwards every byte, reads receipts.

Wiring: the POS prints to `port`; the real printer hangs on `forward_to`. Every byte read from the
POS is written to the printer, unchanged, in the same loop callback that read it and before it is
parsed, so forwarding adds one read cycle and nothing else. Bytes the printer sends back (status
replies to DLE EOT / GS r, ASB) are written back to the POS the same way. Without `forward_to`
the tap only listens (a Y-cable install).

Events: each paper cut (`GS V`) ends a receipt, committed as

    {"type": "pos.receipt", "source": "pos:{name}", "ts": <when the cut arrived>,
     "data": {"lines": ["…", …], "total": "37.00", "member_id": "…",
              "coupons": ["…"], "items": [{"gtin": "…", "qty": "1", …}]}}

`lines` is always there (the text of the receipt, section 4.2 rules). The other keys come from
`[[pos]] patterns` through `extract_fields`: a key is present only when its pattern is configured
and matched (a single-value key as a string, `coupons` as a non-empty list of strings, `items`
as a non-empty list of objects of the pattern's named groups). A receipt that the shutdown cut
short (text after the last cut) is committed with `"partial": true`.

Decisions:
- The POS is never blocked by the printer. While the printer is away (unplugged, not yet
  plugged in, or not taking bytes) what the POS prints is held in memory, up to
  `forward_max` bytes (1 MiB: hundreds of receipts), and written in order when the printer is
  back. Beyond that the oldest bytes are dropped, up to the next `ESC @` (the start of a
  receipt) where there is one, so the printer resumes on a clean command boundary. Every drop
  is an error log line and a `printer` health error with the count. Receipts are still read
  and committed meanwhile.
- Printer replies that arrive while the POS side is closed are dropped (nobody asked for them).
- Health: the POS line is reported as kind `pos`, the printer line as kind `printer`, both under
  the `[[pos]] name`. A buffer refusing receipts shows as an error on the `pos` entry.
- A device that goes away (EIO, hang-up, its path removed or leading to another node) is
  closed and opened again with backoff; the parser keeps its state across a POS reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from agent.config import ConfigError, PosSection
from agent.core.backoff import Backoff
from agent.core.envelope import Event, UtcFormatter
from agent.protocols.escpos import EscposError, ReceiptParser, extract_fields
from agent.sink import DeviceHealth, EventSink
from drivers.serialport import LIVENESS_S, CommitQueue, LinkLost, SerialLink, describe_error

log = logging.getLogger(__name__)

READS_PER_WAKEUP = 16  # bounded, so a POS that never pauses cannot starve the rest of the loop
FORWARD_MAX = 1 << 20  # bytes held for a printer that is away
REPLY_MAX = 4096  # printer replies held for a POS port that cannot take them right now
ESC_INIT = b"\x1b@"
DROP_LOG_EVERY_S = 10.0


class Line:
    """One side of the tap: a `SerialLink`, the bytes waiting to be written to it, its state.

    The link is driven from loop callbacks (`read_nowait`, `write_nowait`), so that what is read
    from one side is written to the other in the same callback. `send` never blocks: it writes
    what the device takes now and keeps the rest (bounded by `out_max`) for the loop's writer
    callback.
    """

    def __init__(self, link: SerialLink, out_max: int) -> None:
        self.link = link
        self.path = link.port
        self.kind = link.kind
        self.name = link.name
        self.out_max = out_max
        self.out = bytearray()
        self.written = 0
        self.dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1  # the fd being watched (the link's, while attached)
        self._lost: asyncio.Future[str] | None = None
        self._writing = False
        self._last_drop_log = -DROP_LOG_EVERY_S

    @property
    def opens(self) -> int:
        """How many times the device was opened."""
        return self.link.opens

    @property
    def alive(self) -> bool:
        """Open and not failed."""
        return self.link.is_open and self._lost is not None and not self._lost.done()

    def open(self) -> None:
        """Open the device once (raises LinkLost saying why it cannot be)."""
        self.link.open_once()

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> asyncio.Future[str]:
        """Start watching the open device; the future resolves with the reason it failed."""
        self._loop = loop
        self._lost = loop.create_future()
        self._fd = self.link.fileno()
        loop.add_reader(self._fd, on_readable)
        if self.out:
            self._want_write()
        return self._lost

    def fail(self, reason: str) -> None:
        """The device went away: stop watching it; its owner closes it and opens it again."""
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)
        self._unwatch()

    def close(self) -> None:
        """Stop watching and close the device (idempotent); queued bytes stay queued."""
        self._unwatch()
        self.link.close()

    def _unwatch(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = -1
        self._writing = False

    def read(self) -> bytes:
        """What the device sent (b"" when nothing); a failure calls `fail` and returns b""."""
        try:
            return self.link.read_nowait()
        except LinkLost as exc:
            self.fail(describe_error(exc))
            return b""

    def send(self, data: bytes) -> None:
        """Write `data` now if the device takes it, else queue it (in order)."""
        if not self.out and self.alive:
            n = self._write(data)
            if n == len(data):
                return
            data = data[n:]
        self.out += data
        if len(self.out) > self.out_max:
            self._trim()
        if self.alive:
            self._want_write()

    def _write(self, data: bytes | bytearray) -> int:
        try:
            n = self.link.write_nowait(data)
        except LinkLost as exc:
            self.fail(describe_error(exc))
            return 0
        self.written += n
        return n

    def _want_write(self) -> None:
        if not self._writing and self._loop is not None and self._fd >= 0:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        n = self._write(self.out)
        if not self.alive:
            return
        del self.out[:n]
        if not self.out and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _trim(self) -> None:
        excess = len(self.out) - self.out_max
        start = self.out.find(ESC_INIT, excess)  # resume at the start of a receipt if there is one
        cut = start if start >= 0 else excess
        del self.out[:cut]
        self.dropped += cut
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_EVERY_S:  # a POS printing on would flood the log
            self._last_drop_log = now
            log.error(
                "%s:%s: %s is not taking bytes; %d bytes for it dropped so far (oldest first)",
                self.kind,
                self.name,
                self.path,
                self.dropped,
            )


class ReceiptTap:
    """A POS printer line: forward both ways, unchanged; every receipt becomes `pos.receipt`."""

    def __init__(
        self,
        cfg: PosSection,
        sink: EventSink,
        health: DeviceHealth,
        *,
        clock: Callable[[], float] = time.time,
        reopen_max_s: float = 5.0,
        retry_max_s: float = 5.0,
        forward_max: int = FORWARD_MAX,
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.health = health
        self.clock = clock
        self.source = f"pos:{cfg.name}"
        self.reopen_max_s = reopen_max_s
        try:
            self.parser = ReceiptParser(cfg.encoding)
            extract_fields([], cfg.patterns)  # compiles every pattern: a bad regex fails at start
        except EscposError as exc:
            raise ConfigError(f"pos {cfg.name!r}: {exc}") from None
        self.pos = Line(
            SerialLink(cfg.port, cfg.baudrate, kind="pos", name=cfg.name, health=health), REPLY_MAX
        )
        self.printer = (
            Line(
                SerialLink(cfg.forward_to, cfg.baudrate, kind="printer", name=cfg.name, health=health),
                forward_max,
            )
            if cfg.forward_to
            else None
        )
        self.queue = CommitQueue(sink, self.source, self._buffer_state, retry_max_s=retry_max_s)
        self.bytes_in = 0
        self.receipts = 0
        self.replies_dropped = 0
        self._fmt = UtcFormatter()
        self._printer_drops_reported = 0

    def _buffer_state(self, ok: bool, error: str | None) -> None:
        self.health.report("pos", self.cfg.name, self.pos.link.is_open, None if ok else error)

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forward and read receipts until cancelled."""
        tasks = [
            asyncio.create_task(self.queue.run(), name=f"{self.source}:commit"),
            asyncio.create_task(self._serve(self.pos, self._pos_readable), name=f"{self.source}:pos"),
        ]
        if self.printer is not None:
            tasks.append(
                asyncio.create_task(
                    self._serve(self.printer, self._printer_readable), name=f"{self.source}:printer"
                )
            )
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a bug in a side: let the daemon log it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for line in (self.pos, self.printer):
                if line is not None:
                    line.close()
            if self.printer is not None and self.printer.out:
                log.error(
                    "%s: stopping with %d bytes not forwarded to the printer",
                    self.source,
                    len(self.printer.out),
                )
            for receipt in self.parser.flush():
                self._commit(receipt.lines, partial=True)
            await self.queue.close()

    async def _serve(self, line: Line, on_readable: Callable[[], None]) -> None:
        """Keep one side open: open with backoff, watch it, reopen when it goes away."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(base=0.1, cap=self.reopen_max_s)
        last_error: str | None = None
        while True:
            try:
                line.open()  # on the loop thread: see drivers/serialport.py
            except OSError as exc:
                line.close()
                error = describe_error(exc)
                if error != last_error:
                    log.warning(
                        "%s: cannot open %s %s: %s; retrying", self.source, line.kind, line.path, error
                    )
                    last_error = error
                dropped = f"; {line.dropped} bytes dropped" if line.dropped else ""
                self.health.report(line.kind, line.name, False, f"cannot open {line.path}: {error}{dropped}")
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            last_error = None
            lost = line.attach(loop, on_readable)
            log.info("%s: opened %s %s", self.source, line.kind, line.path)
            self.health.report(line.kind, line.name, True)
            try:
                while True:
                    done, _ = await asyncio.wait((lost,), timeout=LIVENESS_S)
                    if done:
                        reason = lost.result()
                        break
                    if line.link.moved():
                        reason = "its path now leads to another device"
                        break
                    self._check_drops(line)
            finally:
                line.close()
            log.warning("%s: %s %s gone (%s); reopening", self.source, line.kind, line.path, reason)
            self.health.report(line.kind, line.name, False, f"device gone: {reason}")

    def _check_drops(self, line: Line) -> None:
        if line is self.printer and line.dropped != self._printer_drops_reported:
            self._printer_drops_reported = line.dropped
            self.health.report(
                "printer",
                line.name,
                line.alive,
                f"{line.dropped} bytes for the printer dropped while it took none",
            )

    # --- the two directions -----------------------------------------------------------------------

    def _pos_readable(self) -> None:
        # Forward everything there is before parsing any of it: a large write reaches us in
        # several tty reads, and the printer must not wait for the parser between them.
        parts = []
        for _ in range(READS_PER_WAKEUP):
            part = self.pos.read()
            if not part:
                break
            if self.printer is not None:
                self.printer.send(part)
            parts.append(part)
        if not parts:
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.bytes_in += len(data)
        try:
            receipts = self.parser.feed(data)
        except Exception as exc:  # a parser bug must never stop the forwarding
            log.error("%s: receipt parser failed (%s); starting afresh", self.source, exc, exc_info=exc)
            self.parser = ReceiptParser(self.cfg.encoding)
            return
        for receipt in receipts:
            self._commit(receipt.lines)

    def _printer_readable(self) -> None:
        assert self.printer is not None
        data = self.printer.read()
        if not data:
            return
        if self.pos.alive:
            self.pos.send(data)
        else:
            self.replies_dropped += len(data)
            log.debug(
                "%s: %d reply bytes from the printer dropped: the POS line is closed", self.source, len(data)
            )

    def _commit(self, lines: list[str], partial: bool = False) -> None:
        self.queue.put(
            Event(
                "pos.receipt",
                self.receipt_data(lines, partial),
                self.source,
                self._fmt.format(int(self.clock() * 1000)),
            )
        )
        self.receipts += 1
        self.health.seen("pos", self.cfg.name)

    def receipt_data(self, lines: list[str], partial: bool = False) -> dict:
        """The event's `data`: the lines, plus every configured field that matched."""
        data: dict = {"lines": lines}
        try:
            fields = extract_fields(lines, self.cfg.patterns)
        except Exception as exc:  # patterns were checked at start; keep the receipt regardless
            log.error("%s: field extraction failed: %s", self.source, exc)
            fields = {}
        for key, value in fields.items():
            if value is not None and value != []:
                data[key] = value
        if partial:
            data["partial"] = True
        return data
