"""The receipt tap (drivers/receipt_tap.py) over real ptys, committing into a real Outbox file."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.buffer import Outbox
from agent.config import ConfigError, PosSection
from agent.health import HealthBoard
from agent.protocols.escpos import extract_receipts
from drivers.receipt_tap import ReceiptTap
from drivers.sim.devices import (
    DEMO_PATTERNS,
    STATUS_OK,
    Line,
    PrinterSimulator,
    PrintingPosSimulator,
    receipt_bytes,
    write_all,
)
from tests.support.buffer import stored_events
from tests.support.ptys import Pty
from tests.support.wait import run_async, wait_until_async


def tap_cfg(port: str, forward_to: str | None, patterns: dict[str, str] | None = None) -> PosSection:
    return PosSection(
        name="front-2",
        port=port,
        protocol="escpos",
        forward_to=forward_to,
        encoding="gb18030",
        patterns=patterns or {},
    )


class Collector:
    """Reads everything that arrives on a pty master, in a task."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Collector:
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                self.data += os.read(self.fd, 65536)
            except (BlockingIOError, OSError):
                pass

        loop.add_reader(self.fd, readable)
        return self

    def stop(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)


async def with_tap(tap: ReceiptTap, body: Callable[[], Awaitable[None]], wait_printer: bool = True) -> None:
    task = asyncio.create_task(tap.run())
    try:
        assert await wait_until_async(
            lambda: (
                tap.pos.alive
                and (not wait_printer or tap.printer is None or tap.printer.alive, 10)
                or task.done()
            )
        )
        assert not task.done()
        await body()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


SAMPLE_LINES = [
    Line("6901234567892", "农夫山泉 550ml", 2, 200),
    Line("6920100001230", "康师傅红烧牛肉面", 1, 450),
]


def sample_receipt(number: int, member: str | None = "8812345678", coupon: str | None = "MJ-20OFF") -> bytes:
    return receipt_bytes(number, SAMPLE_LINES, member, coupon, 1_795_000_000.0)


@pytest.mark.parametrize("chunk_sizes", [[1], [2, 3, 5], [63, 64, 65], [511, 4096], [1, 7, 1000, 17, 65536]])
def test_every_byte_reaches_the_printer_unchanged(
    outbox: Outbox, ptys: tuple[Pty, Pty], chunk_sizes: list[int]
) -> None:
    pos, printer = ptys
    rng = random.Random(len(chunk_sizes) * 1000 + chunk_sizes[0])
    # every byte value (XON/XOFF, ^C, CR, DEL, NUL included), a receipt with raster/QR/barcode
    # data, and random binary
    stream = bytes(range(256)) * 4 + sample_receipt(1) + rng.randbytes(20_000) + bytes(range(255, -1, -1))
    tap = ReceiptTap(tap_cfg(pos.path, printer.path), outbox, HealthBoard())

    async def body() -> None:
        got = Collector(printer.master).start()
        try:
            i = 0
            k = 0
            while i < len(stream):
                n = chunk_sizes[k % len(chunk_sizes)]
                await write_all(pos.master, stream[i : i + n])
                i += n
                k += 1
            assert await wait_until_async(lambda: len(got.data) >= len(stream), 10)
        finally:
            got.stop()
        assert bytes(got.data) == stream

    run_async(with_tap(tap, body))


def test_receipts_become_events_with_the_configured_fields(outbox: Outbox, ptys: tuple[Pty, Pty]) -> None:
    pos, printer = ptys
    patterns = {**DEMO_PATTERNS, "cashier": r"收银员[:：]\s*(\d+)", "points": r"积分[:：]\s*(\d+)"}
    tap = ReceiptTap(tap_cfg(pos.path, printer.path, patterns), outbox, HealthBoard())
    first, second = sample_receipt(1), sample_receipt(2, member=None, coupon=None)

    async def body() -> None:
        got = Collector(printer.master).start()
        await write_all(pos.master, first + second, chunk=100)
        assert await wait_until_async(lambda: outbox.count == 2, 10)
        assert await wait_until_async(lambda: len(got.data) == len(first) + len(second), 10)
        got.stop()

    run_async(with_tap(tap, body))
    a, b = stored_events(outbox)
    assert (a["type"], a["source"]) == ("pos.receipt", "pos:front-2")
    assert a["data"]["lines"] == extract_receipts(first)[0].lines
    assert "鲜丰便利店（南京西路店）" in a["data"]["lines"]
    assert a["data"]["total"] == "8.50"
    assert a["data"]["member_id"] == "8812345678"
    assert a["data"]["coupons"] == ["MJ-20OFF"]
    assert a["data"]["cashier"] == "07"
    assert a["data"]["items"] == [
        {"gtin": "6901234567892", "qty": "2", "unit_price": "2.00", "amount": "4.00"},
        {"gtin": "6920100001230", "qty": "1", "unit_price": "4.50", "amount": "4.50"},
    ]
    assert "points" not in a["data"]  # configured, not matched: left out
    assert b["data"].keys() == {"lines", "total", "items", "cashier"}  # no member, no coupon


def test_printer_replies_reach_the_pos(outbox: Outbox, ptys: tuple[Pty, Pty]) -> None:
    pos, printer = ptys
    tap = ReceiptTap(tap_cfg(pos.path, printer.path), outbox, HealthBoard())

    async def body() -> None:
        at_printer, at_pos = Collector(printer.master).start(), Collector(pos.master).start()
        os.write(pos.master, b"\x10\x04\x01")  # DLE EOT 1: transmit printer status
        assert await wait_until_async(lambda: bytes(at_printer.data) == b"\x10\x04\x01", 10)
        os.write(printer.master, bytes([STATUS_OK]))
        assert await wait_until_async(lambda: bytes(at_pos.data) == bytes([STATUS_OK]), 10)
        os.write(printer.master, bytes(range(256)))  # ASB and anything else: unchanged too
        assert await wait_until_async(lambda: len(at_pos.data) == 257, 10)
        at_printer.stop()
        at_pos.stop()
        assert bytes(at_pos.data) == bytes([STATUS_OK]) + bytes(range(256))

    run_async(with_tap(tap, body))


def test_with_the_demo_pos_and_printer(outbox: Outbox, ptys: tuple[Pty, Pty]) -> None:
    pos, printer = ptys
    pos_sim = PrintingPosSimulator(pos.master, rate_per_min=0, rng=random.Random(5))
    printer_sim = PrinterSimulator(printer.master)
    tap = ReceiptTap(tap_cfg(pos.path, printer.path, DEMO_PATTERNS), outbox, HealthBoard())

    async def body() -> None:
        sim = asyncio.create_task(printer_sim.run())
        try:
            sent = [await pos_sim.print_receipt() for _ in range(3)]
            assert await wait_until_async(lambda: outbox.count == 3, 10)
            assert await wait_until_async(lambda: printer_sim.received == sum(len(s) + 3 for s in sent), 10)
        finally:
            sim.cancel()
        assert pos_sim.statuses == [STATUS_OK] * 3  # each DLE EOT answered through the tap
        assert printer_sim.cuts == 3

    run_async(with_tap(tap, body))
    for event in stored_events(outbox):
        data = event["data"]
        assert data["lines"][1] == "鲜丰便利店（南京西路店）"
        assert "Thank you, welcome back!" in data["lines"]
        total = sum(int(i["qty"]) * float(i["unit_price"]) for i in data["items"])
        assert f"{total:.2f}" == data["total"]


def test_absent_printer_does_not_block_the_pos(outbox: Outbox, tmp_path: Path) -> None:
    pos, printer = Pty(), Pty()
    link = tmp_path / "printer"  # not there yet
    health = HealthBoard()
    tap = ReceiptTap(tap_cfg(pos.path, str(link)), outbox, health, reopen_max_s=0.1)
    receipts = sample_receipt(1) + sample_receipt(2)

    async def body() -> None:
        await write_all(pos.master, receipts)
        assert await wait_until_async(
            lambda: outbox.count == 2, 10
        )  # read and committed with no printer at all
        states = {s["kind"]: s for s in health.snapshot()}
        assert states["pos"]["up"] is True
        assert states["printer"]["up"] is False and "No such file" in states["printer"]["error"]
        got = Collector(printer.master).start()
        link.symlink_to(printer.path)  # plugged in: what was held is printed, in order
        assert await wait_until_async(lambda: len(got.data) == len(receipts), 10)
        assert bytes(got.data) == receipts
        # unplug and plug in again: forwarding goes on
        got.stop()
        link.unlink()
        printer.close()
        assert await wait_until_async(lambda: not tap.printer.alive, 10)
        await write_all(pos.master, sample_receipt(3))
        assert await wait_until_async(lambda: outbox.count == 3, 10)
        again = Pty()
        try:
            got = Collector(again.master).start()
            link.symlink_to(again.path)
            assert await wait_until_async(lambda: bytes(got.data) == sample_receipt(3), 10)
            got.stop()
        finally:
            again.close()

    try:
        run_async(with_tap(tap, body, wait_printer=False))
    finally:
        pos.close()
        printer.close()


def test_printer_away_too_long_drops_oldest_at_a_receipt_start(outbox: Outbox, tmp_path: Path) -> None:
    pos, printer = Pty(), Pty()
    link = tmp_path / "printer"
    health = HealthBoard()
    one = sample_receipt(1)
    tap = ReceiptTap(
        tap_cfg(pos.path, str(link)), outbox, health, reopen_max_s=0.1, forward_max=len(one) * 2 + 100
    )
    receipts = [sample_receipt(n) for n in range(1, 6)]

    async def body() -> None:
        await write_all(pos.master, b"".join(receipts))
        assert await wait_until_async(lambda: outbox.count == 5, 10)  # every receipt still becomes an event
        assert tap.printer.dropped == sum(len(r) for r in receipts[:3])
        got = Collector(printer.master).start()
        link.symlink_to(printer.path)
        assert await wait_until_async(lambda: len(got.data) == len(receipts[3]) + len(receipts[4]), 10)
        got.stop()
        assert bytes(got.data) == receipts[3] + receipts[4]  # whole receipts, from their ESC @
        states = {s["kind"]: s for s in health.snapshot()}
        assert await wait_until_async(lambda: "dropped" in (health.snapshot()[1]["error"] or ""), 10)
        assert states["pos"]["up"] is True

    try:
        run_async(with_tap(tap, body, wait_printer=False))
    finally:
        pos.close()
        printer.close()


def test_listen_only_without_forward_to(outbox: Outbox, ptys: tuple[Pty, Pty]) -> None:
    pos, _ = ptys
    tap = ReceiptTap(tap_cfg(pos.path, None, {"total": DEMO_PATTERNS["total"]}), outbox, HealthBoard())

    async def body() -> None:
        await write_all(pos.master, sample_receipt(9))
        assert await wait_until_async(lambda: outbox.count == 1, 10)

    run_async(with_tap(tap, body))
    assert stored_events(outbox)[0]["data"]["total"] == "8.50"


def test_unfinished_receipt_at_shutdown_is_kept_as_partial(outbox: Outbox, ptys: tuple[Pty, Pty]) -> None:
    pos, printer = ptys
    tap = ReceiptTap(tap_cfg(pos.path, printer.path), outbox, HealthBoard())
    head = "合计：12.00\n".encode("gb18030")

    async def body() -> None:
        os.write(pos.master, b"\x1b@" + head)
        assert await wait_until_async(lambda: tap.bytes_in == 2 + len(head), 10)

    run_async(with_tap(tap, body))
    (event,) = stored_events(outbox)
    assert event["data"] == {"lines": ["合计：12.00"], "partial": True}


def test_bad_pattern_or_encoding_is_a_config_error(ptys: tuple[Pty, Pty]) -> None:
    pos, printer = ptys
    with pytest.raises(ConfigError, match="front-2.*total"):
        # PosSection refuses the pattern at load; model_copy skips validation, as a hand-made config could
        unchecked = tap_cfg(pos.path, printer.path).model_copy(update={"patterns": {"total": "(unclosed"}})
        ReceiptTap(unchecked, None, HealthBoard())  # type: ignore[arg-type]
    bad = tap_cfg(pos.path, printer.path).model_copy(update={"encoding": "no-such-codec"})
    with pytest.raises(ConfigError, match="no-such-codec"):
        ReceiptTap(bad, None, HealthBoard())  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=300).map(lambda b: b.replace(b"\x04", b"\x04\x10\x04\x01")),
    st.lists(st.integers(min_value=1, max_value=40), min_size=1),
)
def test_demo_printer_answers_the_same_however_the_stream_is_split(stream: bytes, sizes: list[int]) -> None:
    whole = PrinterSimulator(-1)._replies(stream)
    printer = PrinterSimulator(-1)
    pieces, i, k = [], 0, 0
    while i < len(stream):
        pieces.append(printer._replies(stream[i : i + sizes[k % len(sizes)]]))
        i += sizes[k % len(sizes)]
        k += 1
    assert b"".join(pieces) == whole
    expected = sum(
        1
        for j in range(len(stream) - 2)
        if stream[j : j + 2] == b"\x10\x04" and stream[j + 2] in (1, 2, 3, 4)
    )
    assert len(whole) == expected
    assert set(whole) <= {STATUS_OK}
