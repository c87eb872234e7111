"""A simulated POS for the demo store: rings up transactions on a pty, the way a real till does.

It speaks `stxetx` (contract section 4.1) on the pty master: one frame at a time, waits for the
answer, resends on NAK or after 2 s of silence, and moves on only after an ACK. It sells from the
demo store's one catalogue (`drivers.sim.catalogue`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from datetime import datetime
from decimal import Decimal

import orjson

from agent.protocols.stxetx import ACK, NAK, encode_frame
from drivers.sim.catalogue import CATALOGUE

log = logging.getLogger(__name__)

RESEND_AFTER_S = 2.0


class PosSimulator:
    """A till on `master_fd` (a pty master) selling `rate_per_min` transactions a minute on average."""

    def __init__(
        self, master_fd: int, register: str, rate_per_min: float, *, seed: int | None = None
    ) -> None:
        self.fd = master_fd
        self.register = register
        self.rate_per_min = rate_per_min
        self._rng = random.Random(seed)
        # transaction numbers are unique across restarts of the demo: a till never reuses one
        self._session = f"{int(time.time()) % 1_000_000:06d}"
        self._number = 0
        self._recent: list[str] = []
        self.acked = 0
        self.resends = 0

    async def run(self) -> None:
        """Sell until cancelled."""
        if self.rate_per_min <= 0:
            await asyncio.Event().wait()
        os.set_blocking(self.fd, False)
        while True:
            await asyncio.sleep(self._rng.expovariate(self.rate_per_min / 60.0))
            await self.send(self.transaction())

    def transaction(self, now: datetime | None = None) -> dict[str, object]:
        """The next transaction payload: mostly sales, some returns and voids."""
        rng = self._rng
        self._number += 1
        txn_id = f"{self.register}-{self._session}-{self._number:05d}"
        roll = rng.random()
        kind = "sale" if roll < 0.88 else "return" if roll < 0.96 else "void"
        picks = rng.sample(CATALOGUE, rng.randint(1, 1 if kind == "return" else 5))
        items = []
        total = Decimal(0)
        for product in picks:
            qty = rng.choice((1, 1, 1, 2, 3)) if kind != "return" else 1
            items.append(
                {"gtin": product.gtin14, "name": product.name, "qty": qty, "unit_price": product.price}
            )
            total += Decimal(product.price) * qty
        payload: dict[str, object] = {
            "txn_id": txn_id,
            "register": self.register,
            "ts": (now or datetime.now().astimezone()).isoformat(timespec="seconds"),
            "kind": kind,
            "items": items,
            "total": f"{total:.2f}",
            "currency": "CNY",
        }
        if kind == "void" and self._recent:
            payload["voids"] = self._recent[-1]
        if rng.random() < 0.35:
            payload["member_id"] = f"M{rng.randrange(10**9):09d}"
        if kind == "sale" and rng.random() < 0.15:
            coupon = rng.choice(("C-SPRING-5", "C-MILK-2", "C-WELCOME-10"))
            payload["coupons"] = [coupon]
        if kind == "sale" and rng.random() < 0.06:
            payload["pickup_code"] = f"{rng.randrange(10**6):06d}"
        self._recent = (self._recent + [txn_id])[-5:]
        return payload

    async def send(self, payload: dict[str, object]) -> None:
        """Send one transaction until it is ACKed (resending on NAK or 2 s of silence)."""
        frame = encode_frame(orjson.dumps(payload))
        while True:
            self._discard_input()  # a late answer to an earlier copy must not count for this one
            try:
                os.write(self.fd, frame)
            except BlockingIOError:  # nobody reads the line (the driver is reopening it)
                await asyncio.sleep(RESEND_AFTER_S)
                continue
            answer = await self._answer(RESEND_AFTER_S)
            if answer == ACK:
                self.acked += 1
                return
            self.resends += 1
            log.debug(
                "pos sim %s: %s, resending %s",
                self.register,
                "NAK" if answer == NAK else "no answer",
                payload["txn_id"],
            )
            if answer is not None:
                await asyncio.sleep(0.05)  # a real till pauses briefly after a NAK

    def _discard_input(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    async def _answer(self, timeout: float) -> int | None:
        """The first ACK or NAK within `timeout` seconds, else None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                data = b""
            except OSError:
                return None
            for byte in data:
                if byte in (ACK, NAK):
                    return byte
            left = deadline - loop.time()
            if left <= 0:
                return None
            if not await self._readable(left):
                return None

    async def _readable(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(self.fd, lambda: None if ready.done() else ready.set_result(None))
        try:
            async with asyncio.timeout(timeout):
                await ready
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self.fd)
