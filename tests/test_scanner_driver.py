"""The scanner driver (drivers/scanner.py) over real ptys, committing into a real Outbox file."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.buffer import Outbox, read_chunks
from agent.config import ScannerSection
from agent.core.envelope import Event
from agent.health import HealthBoard
from agent.protocols.scan import decode_scan
from agent.sink import BufferFull
from drivers.scanner import ScannerDriver
from drivers.serialport import CommitQueue
from drivers.sim.devices import ScannerSimulator, scanner_reads, write_all
from tests.support.buffer import stored_events
from tests.support.ptys import Pty
from tests.support.wait import run_async, wait_until_async

GS = b"\x1d"

# Reads as real scanners send them (AIM prefix first); the expected GTIN of each.
READS = [
    (b"]E06901234567892", "06901234567892"),  # EAN-13, Chinese GS1 prefix 690
    # Source: GS1 General Specifications example (01)09501101530003(17)140704(10)AB-123
    (b"]C1010950110153000317140704" + GS + b"10AB-123", "09501101530003"),
    # Source: morovia.com KB "Input Format: Creating GS1 DataMatrix", leading FNC1 sent as GS
    (b"]d2" + GS + b"01034531200000111712050810ABCD1234" + GS + b"4109501101020917", "03453120000011"),
    (b"]Q1https://id.gs1.org/01/09506000134352/10/ABC123", "09506000134352"),  # GS1 Digital Link
    (b"]Q1PK483920", None),  # a pickup code
    (b"4006381333931", "04006381333931"),  # Wikipedia's EAN-13 example, no AIM prefix
]


async def with_driver(driver: ScannerDriver, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(driver.run())
    try:
        assert await wait_until_async(lambda: driver.up or task.done(), 10)
        assert not task.done()
        await body()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def scanner(port: str, terminator: str = "auto", **kw) -> ScannerSection:
    return ScannerSection(name="desk", port=port, terminator=terminator, **kw)


@pytest.mark.parametrize(
    "terminator, endings",
    [
        ("auto", [b"\r", b"\n", b"\r\n"]),
        ("cr", [b"\r"]),
        ("lf", [b"\n"]),
        ("crlf", [b"\r\n"]),
    ],
)
def test_every_terminator_and_aim_prefix(
    outbox: Outbox, pty: Pty, terminator: str, endings: list[bytes]
) -> None:
    health = HealthBoard()
    driver = ScannerDriver(scanner(pty.path, terminator), outbox, health)
    reads = [raw for raw, _ in READS]

    async def body() -> None:
        stream = b"".join(raw + endings[i % len(endings)] for i, raw in enumerate(reads))
        await write_all(pty.master, stream)
        assert await wait_until_async(lambda: outbox.count == len(reads), 10)

    run_async(with_driver(driver, body))
    events = stored_events(outbox)
    assert [e["type"] for e in events] == ["scan.read"] * len(reads)
    assert {e["source"] for e in events} == {"scanner:desk"}
    assert [e["data"] for e in events] == [decode_scan(raw) for raw in reads]
    assert [e["data"]["aim"] for e in events] == ["]E0", "]C1", "]d2", "]Q1", "]Q1", None]
    assert [e["data"]["gtin"] for e in events] == [gtin for _, gtin in READS]
    assert events[1]["data"]["ai"] == {"01": "09501101530003", "17": "140704", "10": "AB-123"}
    assert events[3]["data"]["ai"]["01"] == "09506000134352"
    assert events[4]["data"] == {**events[4]["data"], "data": "PK483920", "ai": {}, "valid": True}
    assert events[5]["data"]["gtin"] == "04006381333931"
    assert [s["up"] for s in health.snapshot()] == [True]


def test_read_split_across_writes(outbox: Outbox, pty: Pty) -> None:
    driver = ScannerDriver(scanner(pty.path, "crlf"), outbox, HealthBoard())
    read = b"]C1010950110153000317140704" + GS + b"10AB-123\r\n"

    async def body() -> None:
        # one byte per write, each seen by the driver before the next (a slow UART)
        for i in range(len(read)):
            os.write(pty.master, read[i : i + 1])
            assert await wait_until_async(lambda i=i: driver.bytes_in == i + 1, 10)
        assert await wait_until_async(lambda: outbox.count == 1, 10)

    run_async(with_driver(driver, body))
    (event,) = stored_events(outbox)
    assert event["data"] == decode_scan(read)
    assert event["data"]["valid"] is True


def test_many_reads_in_random_chunks_none_lost(outbox: Outbox, pty: Pty) -> None:
    rng = random.Random(7)
    driver = ScannerDriver(scanner(pty.path), outbox, HealthBoard())
    reads = [rng.choice(scanner_reads(rng)) for _ in range(400)]
    stream = b"".join(r + b"\r\n" for r in reads)

    async def body() -> None:
        pos = 0
        while pos < len(stream):
            n = rng.choice([1, 2, 3, 7, 64, 200, 1000])
            await write_all(pty.master, stream[pos : pos + n])
            pos += n
            if rng.random() < 0.3:
                done = min(pos, len(stream))
                assert await wait_until_async(lambda done=done: driver.bytes_in == done, 10)
        assert await wait_until_async(lambda: outbox.count == len(reads), 10)

    run_async(with_driver(driver, body))
    assert [e["data"]["data"] for e in stored_events(outbox)] == [decode_scan(r)["data"] for r in reads]
    assert [e["seq"] for e in stored_events(outbox)] == list(range(1, len(reads) + 1))


def test_unplug_and_replug_through_a_by_id_link(outbox: Outbox, tmp_path: Path) -> None:
    first, second = Pty(), Pty()
    link = tmp_path / "usb-Honeywell_1900-if00"  # what udev's /dev/serial/by-id link looks like
    link.symlink_to(first.path)
    health = HealthBoard()
    driver = ScannerDriver(scanner(str(link)), outbox, health, reopen_max_s=0.2)

    async def body() -> None:
        os.write(first.master, b"]E06901234567892\r\n")
        assert await wait_until_async(lambda: outbox.count == 1, 10)
        os.write(first.master, b"]E0690123")  # cut off by the unplug: not a read
        assert await wait_until_async(lambda: driver.bytes_in == 18 + 9, 10)
        # unplug: udev removes the link, the device node goes away, the open fd gets EIO
        link.unlink()
        first.close()
        assert await wait_until_async(lambda: not driver.up, 10)
        state = health.snapshot()[0]
        assert state["up"] is False and state["error"]
        # replug: a new node, the same by-id link
        link.symlink_to(second.path)
        assert await wait_until_async(lambda: driver.opens == 2, 10)
        os.write(second.master, b"]E04006381333931\r\n")
        assert await wait_until_async(lambda: outbox.count == 2, 10)

    try:
        run_async(with_driver(driver, body))
    finally:
        first.close()
        second.close()
    assert [e["data"]["gtin"] for e in stored_events(outbox)] == ["06901234567892", "04006381333931"]
    assert health.snapshot()[0]["up"] is True


def test_link_moved_to_another_device_while_the_old_one_stays_quiet(outbox: Outbox, tmp_path: Path) -> None:
    first, second = Pty(), Pty()
    link = tmp_path / "scanner"
    link.symlink_to(first.path)
    driver = ScannerDriver(scanner(str(link)), outbox, HealthBoard(), reopen_max_s=0.2)

    async def body() -> None:
        tmp = tmp_path / "scanner.new"
        tmp.symlink_to(second.path)
        os.replace(tmp, link)  # the old node is still open and silent; the path leads elsewhere now
        # the driver notices and opens the new node (pyserial flushes its input at open, and
        # cdc-acm drops what arrives while nobody has the tty open, so write only after that)
        assert await wait_until_async(lambda: driver.opens == 2, 10)
        os.write(second.master, b"]Q1PK000001\r\n")
        assert await wait_until_async(lambda: outbox.count == 1, 10)

    try:
        run_async(with_driver(driver, body))
    finally:
        first.close()
        second.close()
    assert stored_events(outbox)[0]["data"]["data"] == "PK000001"


def test_missing_port_is_reported_and_opened_when_it_appears(outbox: Outbox, tmp_path: Path) -> None:
    p = Pty()
    link = tmp_path / "ttyACM0"
    health = HealthBoard()
    driver = ScannerDriver(scanner(str(link)), outbox, health, reopen_max_s=0.2)

    async def main() -> None:
        task = asyncio.create_task(driver.run())
        try:
            assert await wait_until_async(lambda: health.snapshot() != [], 10)
            state = health.snapshot()[0]
            assert state["up"] is False and "No such file" in state["error"]
            link.symlink_to(p.path)
            assert await wait_until_async(lambda: driver.up, 10)
            os.write(p.master, b"]E06901234567892\n")
            assert await wait_until_async(lambda: outbox.count == 1, 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        run_async(main())
    finally:
        p.close()


def test_buffer_full_retries_until_room_and_keeps_order(tmp_path: Path, pty: Pty) -> None:
    # the whole data_dir counts toward the cap (footprint.py): this leaves events a few KiB
    box = Outbox(tmp_path / "small.db", max_bytes=200 * 1024).start()
    health = HealthBoard()
    driver = ScannerDriver(scanner(pty.path), box, health, retry_max_s=0.05)
    try:
        # fill the buffer with POS events (never dropped by the cap) until it refuses
        filler = Event("pos.sale", {"txn_id": "x" * 200}, "pos:front-1")
        with pytest.raises(BufferFull):
            for _ in range(100):
                box.commit_sync([filler])
        before = box.count

        async def body() -> None:
            os.write(pty.master, b"]E06901234567892\r\n]Q1PK111111\r\n")
            assert await wait_until_async(lambda: "buffer full" in (health.snapshot()[0]["error"] or ""), 10)
            os.write(pty.master, b"]Q1PK222222\r\n")
            assert await wait_until_async(lambda: driver.reads == 3, 10)
            assert box.count == before  # nothing got in, nothing was dropped
            box.acked(read_chunks(box.read_conn(), 0, 1000))  # the uplink sends: room again
            assert await wait_until_async(lambda: box.count == 3, 10)
            assert await wait_until_async(lambda: health.snapshot()[0]["error"] is None, 10)

        run_async(with_driver(driver, body))
        assert [e["data"]["data"] for e in stored_events(box)] == ["6901234567892", "PK111111", "PK222222"]
        assert driver.queue.dropped == 0
    finally:
        box.close()


def test_reads_waiting_at_shutdown_get_a_last_commit(outbox: Outbox, pty: Pty) -> None:
    driver = ScannerDriver(scanner(pty.path), outbox, HealthBoard())

    async def main() -> None:
        task = asyncio.create_task(driver.run())
        assert await wait_until_async(lambda: driver.up, 10)
        driver.queue._wakeup.set = lambda: None  # the committer never wakes: reads stay pending
        os.write(pty.master, b"]Q1PK333333\r\n")
        assert await wait_until_async(lambda: len(driver.queue.pending) == 1, 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run_async(main())
    assert [e["data"]["data"] for e in stored_events(outbox)] == ["PK333333"]


def test_with_the_demo_simulator(outbox: Outbox, pty: Pty) -> None:
    sim = ScannerSimulator(pty.master, rng=random.Random(3))
    driver = ScannerDriver(scanner(pty.path), outbox, HealthBoard())
    reads = scanner_reads(random.Random(11))

    async def body() -> None:
        for read in reads:
            await sim.send(read)
        assert await wait_until_async(lambda: outbox.count == len(reads), 10)

    run_async(with_driver(driver, body))
    data = [e["data"] for e in stored_events(outbox)]
    assert [d["aim"] for d in data] == ["]E0", "]C1", "]d2", "]Q1", "]Q1"]
    # every simulated GS1 read is well-formed: the demo shows valid GS1 data
    assert all(d["valid"] for d in data), [d["errors"] for d in data]
    assert data[1]["ai"].keys() == {"01", "17", "10", "3103"}
    assert data[2]["ai"].keys() == {"01", "21", "17", "10"}
    assert data[4]["ai"].keys() >= {"01", "10", "17"}


def test_an_event_that_cannot_be_encoded_does_not_block_the_others(outbox: Outbox) -> None:
    seen: list[tuple[bool, str | None]] = []
    queue = CommitQueue(outbox, "test", lambda ok, error: seen.append((ok, error)))

    async def main() -> None:
        task = asyncio.create_task(queue.run())
        try:
            queue.put(Event("scan.read", {"data": "A"}, "scanner:x"))
            queue.put(Event("scan.read", {"data": object()}, "scanner:x"))  # not JSON
            queue.put(Event("scan.read", {"data": "C"}, "scanner:x"))
            assert await wait_until_async(lambda: not queue.pending, 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run_async(main())
    assert [e["data"]["data"] for e in stored_events(outbox)] == ["A", "C"]
    assert (queue.committed, queue.dropped) == (2, 1)
