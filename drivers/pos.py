"""The POS driver for the `stxetx` line protocol (contract section 4.1).

Each frame is answered in the order it arrived: ACK only once its event is durably committed,
NAK for what does not frame. A good frame that is not a valid transaction is kept as
`pos.invalid` and ACKed (nothing a POS sent is dropped). When the buffer is full nothing is
answered: the POS keeps its copy and resends after 2 s, and is ACKed once there is room.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

from agent.config import PosSection
from agent.core.envelope import EnvelopeError, Event
from agent.protocols.stxetx import (
    ACK,
    NAK,
    Frame,
    FrameDecoder,
    FrameResult,
    Transaction,
    parse_transaction,
)
from agent.sink import BufferUnavailable, Dedup, DeviceHealth, EventSink
from drivers.serialport import LinkLost, SerialLink

log = logging.getLogger(__name__)

ACK_BYTES = bytes([ACK])
NAK_BYTES = bytes([NAK])
# A noisy line NAKs often: one log line per this many seconds, with the count since the last.
NAK_LOG_EVERY_S = 10.0


class StxEtxDriver:
    """Reads frames from one POS line, commits them, answers ACK/NAK; `run()` until cancelled."""

    def __init__(
        self,
        cfg: PosSection,
        sink: EventSink,
        health: DeviceHealth,
        *,
        link: SerialLink | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.health = health
        self.source = f"pos:{cfg.name}"
        self.link = link or SerialLink(cfg.port, cfg.baudrate, kind="pos", name=cfg.name, health=health)
        self._clock = clock
        self._full = False
        self._nak_logged = float("-inf")
        self._naks_unlogged = 0
        self.counts = {"ack": 0, "nak": 0, "duplicate": 0, "invalid": 0, "unanswered": 0}

    async def run(self) -> None:
        """Open the line (reopening it whenever it goes away) and serve it until cancelled."""
        clock = self._clock or asyncio.get_running_loop().time
        try:
            while True:
                await self.link.open()
                # a frame cut off by a restart or a reopen is gone: its tail is junk (one NAK)
                decoder = FrameDecoder()
                try:
                    while True:
                        chunk = await self.link.read()
                        arrived = clock()
                        for result in decoder.feed(chunk):
                            await self._answer(result, arrived, clock)
                except LinkLost:
                    continue  # health is reported by the link; open() retries with backoff
        finally:
            self.link.close()

    async def _answer(self, result: FrameResult, arrived: float, clock: Callable[[], float]) -> None:
        if not isinstance(result, Frame):
            self.counts["nak"] += 1
            self._naks_unlogged += 1
            if arrived - self._nak_logged >= NAK_LOG_EVERY_S:
                log.info(
                    "%s: NAK: %s (%d NAKs since the last line)",
                    self.source,
                    result.reason,
                    self._naks_unlogged,
                )
                self._nak_logged = arrived
                self._naks_unlogged = 0
            await self._send(NAK_BYTES)
            return
        try:
            duplicate = await self._commit(result.payload)
        except BufferUnavailable:
            self.counts["unanswered"] += 1
            if not self._full:
                self._full = True
                log.warning("%s: buffer full: not acknowledging the POS until there is room", self.source)
                self.health.report(
                    "pos", self.cfg.name, True, "buffer full: transactions are not acknowledged"
                )
            return
        except EnvelopeError as exc:  # cannot happen for JSON we parsed; never crash the line
            self.counts["unanswered"] += 1
            log.error("%s: frame not committed: %s", self.source, exc)
            return
        if self._full and not duplicate:  # a resend needs no room: only a new commit says there is
            self._full = False
            self.health.report("pos", self.cfg.name, True)
        if duplicate:
            self.counts["duplicate"] += 1
        if clock() - arrived > self.cfg.ack_timeout_s:
            # the POS has given up on this copy and resent it (or will): an answer now would be
            # taken as the answer to its next frame; the resend is answered instead (dedup)
            self.counts["unanswered"] += 1
            log.warning(
                "%s: commit took longer than the POS waits (%.1f s): answer withheld",
                self.source,
                self.cfg.ack_timeout_s,
            )
            return
        self.counts["ack"] += 1
        await self._send(ACK_BYTES)

    async def _commit(self, payload: bytes) -> bool:
        """Commit the frame's event; True if it was already committed before (a resend)."""
        parsed = parse_transaction(payload)
        if isinstance(parsed, Transaction):
            event = Event(parsed.event_type, parsed.data, self.source, parsed.ts_utc)
            dedup = Dedup(namespace=f"pos:{parsed.register}", key=parsed.txn_id)
        else:
            self.counts["invalid"] += 1
            log.warning("%s: invalid transaction kept as pos.invalid: %s", self.source, parsed.reason)
            event = Event("pos.invalid", parsed.data, self.source)
            # a resent invalid frame is the same bytes: keep it once, like a resent transaction
            dedup = Dedup(namespace=f"pos-invalid:{self.cfg.name}", key=hashlib.sha256(payload).hexdigest())
        committed = await self.sink.commit([event], dedup=dedup)
        self.health.seen("pos", self.cfg.name)
        return committed.duplicate

    async def _send(self, answer: bytes) -> None:
        # an answer the line cannot take within the POS's wait is useless: the POS resends
        if not await self.link.write(answer, timeout=self.cfg.ack_timeout_s):
            log.warning(
                "%s: the line did not take the answer within %.1f s", self.source, self.cfg.ack_timeout_s
            )
