"""The stxetx POS driver (drivers/pos.py) over real ptys, with a real Outbox on a tmp SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from agent.buffer import Outbox, read_chunks
from agent.config import PosSection
from agent.core.envelope import Event
from agent.health import HealthBoard
from agent.protocols.stxetx import ACK, MAX_PAYLOAD, NAK, encode_frame
from agent.sink import BufferFull, Committed, Dedup
from drivers.pos import StxEtxDriver
from tests.support.buffer import open_outbox, stored_events
from tests.support.ptys import Pty
from tests.support.wait import wait_until_async

A = bytes([ACK])
N = bytes([NAK])


def txn(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "txn_id": f"R1-{n:06d}",
        "register": "R1",
        "ts": "2026-11-23T16:15:02.250+08:00",
        "kind": "sale",
        "items": [{"gtin": "06901234567892", "qty": 1, "unit_price": "12.50"}],
        "total": "12.50",
        "currency": "CNY",
        **extra,
    }


def frame(obj: Any) -> bytes:
    return encode_frame(orjson.dumps(obj))


class Line(Pty):
    """The POS end of a real pty: the test writes frames to the master and reads the answers."""

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:  # a 64 KiB frame is more than the pty holds at once
                pass

    async def send_async(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                await asyncio.sleep(0.001)

    async def answers(self, until: bytes = b"", count: int = 1, timeout: float = 10.0) -> bytes:
        """Answers read until `count` bytes arrived (or the byte `until` did)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        got = b""
        while (until not in got) if until else (len(got) < count):
            try:
                got += os.read(self.master, 4096)
                continue
            except BlockingIOError:
                pass
            if loop.time() > deadline:
                raise AssertionError(f"no answer within {timeout} s (got {got!r})")
            await asyncio.sleep(0.002)
        return got


def device_up(health: HealthBoard, name: str = "front-1") -> bool:
    return any(d["kind"] == "pos" and d["name"] == name and d["up"] for d in health.snapshot())


@contextlib.asynccontextmanager
async def running(
    port: str, sink: Any, health: HealthBoard | None = None, **kw: Any
) -> AsyncIterator[StxEtxDriver]:
    health = health or HealthBoard()
    cfg = PosSection(name="front-1", port=port, **kw.pop("cfg", {}))
    driver = StxEtxDriver(cfg, sink, health, **kw)
    task = asyncio.create_task(driver.run())
    try:
        assert await wait_until_async(lambda: device_up(health) or task.done(), 10)
        if task.done():
            task.result()
        yield driver
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def setup(tmp_path: Path, **outbox_kw: Any):
    line = Line()
    try:
        with open_outbox(
            tmp_path / "buffer.db", tenant="acme", store="sh-0012", agent="till-1", **outbox_kw
        ) as outbox:
            yield line, outbox
    finally:
        line.close()


def test_ack_only_after_the_commit(tmp_path: Path) -> None:
    async def main() -> None:
        with setup(tmp_path) as (line, outbox):
            async with running(line.path, outbox):
                line.send(frame(txn(1)))
                assert await line.answers() == A
                # the moment the POS has its ACK, the event is in the file for anyone to read
                events = stored_events(outbox.path)
                assert len(events) == 1
                event = events[0]
                assert event["type"] == "pos.sale"
                assert event["source"] == "pos:front-1"
                assert event["ts"] == "2026-11-23T08:15:02.250Z"
                assert event["data"] == txn(1)
                assert (event["tenant"], event["store"], event["agent"]) == ("acme", "sh-0012", "till-1")

    asyncio.run(main())


def test_kinds_and_commit_time_when_no_ts(tmp_path: Path) -> None:
    async def main() -> None:
        with setup(tmp_path) as (line, outbox):
            async with running(line.path, outbox):
                no_ts = {k: v for k, v in txn(3, kind="void").items() if k != "ts"}
                line.send(frame(txn(1, kind="return")) + frame(txn(2, kind="sale")) + frame(no_ts))
                assert await line.answers(count=3) == A * 3
                events = stored_events(outbox.path)
                assert [e["type"] for e in events] == ["pos.return", "pos.sale", "pos.void"]
                assert events[2]["ts"].endswith("Z") and events[2]["ts"] != events[0]["ts"]

    asyncio.run(main())


def test_nak_cases_store_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        with setup(tmp_path) as (line, outbox):
            async with running(line.path, outbox):
                bad_lrc = bytearray(frame(txn(1)))
                bad_lrc[-1] ^= 0x55
                line.send(bytes(bad_lrc))
                assert await line.answers() == N
                line.send(b"\r\nline noise")
                assert await line.answers() == N
                await line.send_async(b"\x02" + b"x" * (MAX_PAYLOAD + 1) + b"\x03\x00")
                assert await line.answers() == N
                line.send(b'\x02{"half"' + frame(txn(2)))  # STX inside an unfinished frame
                assert await line.answers(count=2) == N + A
                assert [e["data"]["txn_id"] for e in stored_events(outbox.path)] == ["R1-000002"]

    asyncio.run(main())


def test_largest_frame_is_accepted(tmp_path: Path) -> None:
    async def main() -> None:
        with setup(tmp_path) as (line, outbox):
            async with running(line.path, outbox):
                body = orjson.dumps(txn(1, note=""))
                payload = body.replace(b'"note":""', b'"note":"' + b"n" * (MAX_PAYLOAD - len(body)) + b'"')
                assert len(payload) == MAX_PAYLOAD
                await line.send_async(encode_frame(payload))
                assert await line.answers() == A
                assert stored_events(outbox.path)[0]["type"] == "pos.sale"

    asyncio.run(main())


def test_garbage_before_a_frame(tmp_path: Path) -> None:
    async def main() -> None:
        with setup(tmp_path) as (line, outbox):
            async with running(line.path, outbox):
                line.send(b"\xff\x00garbage\x03\x15" + frame(txn(1)))
                assert await line.answers(count=2) == N + A
                assert len(stored_events(outbox.path)) == 1

    asyncio.run(main())


def test_partial_frames_across_reads(tmp_path: Path) -> None:
    async def main() -> None:
        with setup(tmp_path) as (line, outbox):
            async with running(line.path, outbox):
                data = frame(txn(1)) + frame(txn(2))
                for cut in (1, 7, len(data) // 2 - 1, len(data) // 2, len(data) - 1):
                    outbox_before = len(stored_events(outbox.path))
                    line.send(data[:cut])
                    assert await wait_until_async(
                        lambda: line.unread() == 0, 10
                    )  # the driver has read the first piece
                    line.send(data[cut:])
                    assert await line.answers(count=2) == A * 2
                    assert len(stored_events(outbox.path)) == outbox_before + (2 if cut == 1 else 0)
                small = frame(txn(3))
                for byte in small:  # one byte per read
                    line.send(bytes([byte]))
                    assert await wait_until_async(lambda: line.unread() == 0, 10)
                assert await line.answers() == A
                assert sorted(e["data"]["txn_id"] for e in stored_events(outbox.path)) == [
                    "R1-000001",
                    "R1-000002",
                    "R1-000003",
                ]

    asyncio.run(main())


def test_invalid_transaction_is_kept_and_acked(tmp_path: Path) -> None:
    async def main() -> None:
        with setup(tmp_path) as (line, outbox):
            async with running(line.path, outbox) as driver:
                line.send(encode_frame(b"not json at all"))
                assert await line.answers() == A
                money_as_number = orjson.dumps(txn(1, total=12.5))
                line.send(encode_frame(money_as_number))
                assert await line.answers() == A
                line.send(encode_frame(money_as_number))  # the POS resent it: kept once
                assert await line.answers() == A
                events = stored_events(outbox.path)
                assert [e["type"] for e in events] == ["pos.invalid", "pos.invalid"]
                assert events[0]["data"]["raw"] == "bm90IGpzb24gYXQgYWxs"
                assert events[0]["data"]["reason"].startswith("payload is not JSON")
                assert events[1]["data"]["reason"].startswith("total: money must be a decimal string")
                assert events[1]["source"] == "pos:front-1"
                assert driver.counts["invalid"] == 3

    asyncio.run(main())


def test_duplicate_txn_id_is_acked_and_stored_once(tmp_path: Path) -> None:
    async def main() -> None:
        with setup(tmp_path) as (line, outbox):
            async with running(line.path, outbox):
                line.send(frame(txn(1)))
                assert await line.answers() == A
                line.send(frame(txn(1)) + frame(txn(1, total="99.00")))  # same (register, txn_id)
                assert await line.answers(count=2) == A * 2
                other_register = txn(1, register="R2")
                line.send(frame(other_register))  # same txn_id from another register is another txn
                assert await line.answers() == A
                events = stored_events(outbox.path)
                assert [(e["data"]["register"], e["data"]["total"]) for e in events] == [
                    ("R1", "12.50"),
                    ("R2", "12.50"),
                ]

    asyncio.run(main())


def test_buffer_full_gets_no_ack_until_there_is_room(tmp_path: Path) -> None:
    async def main() -> None:
        health = HealthBoard()
        # the whole data_dir counts toward the cap (footprint.py): this leaves events a few KiB
        with setup(tmp_path, max_bytes=200 * 1024) as (line, outbox):
            async with running(line.path, outbox, health):
                line.send(frame(txn(1)))
                assert await line.answers() == A
                with contextlib.suppress(BufferFull):
                    for _ in range(100):  # fill the cap with POS events (never dropped)
                        await outbox.commit([Event("pos.sale", {"pad": "x" * 300}, "pos:other")])
                held = len(stored_events(outbox.path))
                # a new transaction, a resend of a committed one, then junk: answers come in order,
                # so exactly ACK (the resend) then NAK (the junk) proves the new one got nothing
                line.send(frame(txn(2)) + frame(txn(1)) + b"junk")
                assert await line.answers(until=N) == A + N
                assert len(stored_events(outbox.path)) == held
                assert "buffer full" in (health.snapshot()[0]["error"] or "")
                # the broker takes the backlog: room again, and the POS's resend is ACKed
                outbox.acked(read_chunks(outbox.read_conn(), 0, 1000))
                await asyncio.to_thread(outbox.flush)
                line.send(frame(txn(2)))
                assert await line.answers() == A
                assert [e["data"]["txn_id"] for e in stored_events(outbox.path)] == ["R1-000002"]
                assert health.snapshot()[0]["error"] is None

    asyncio.run(main())


class GatedSink:
    """A sink whose commits wait for the test to open a gate (a disk that stalls)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.gate = asyncio.Event()
        self.waiting = 0

    async def commit(self, events: Sequence[Event], dedup: Dedup | None = None) -> Committed:
        self.waiting += 1
        await self.gate.wait()
        return await self.outbox.commit(events, dedup)

    def offer(self, event: Event) -> None:
        self.outbox.offer(event)


def test_answer_is_withheld_when_the_commit_outlasts_the_pos_wait(tmp_path: Path) -> None:
    async def main() -> None:
        now = [1000.0]
        with setup(tmp_path) as (line, outbox):
            sink = GatedSink(outbox)
            async with running(line.path, sink, clock=lambda: now[0], cfg={"ack_timeout_s": 2.0}):
                line.send(frame(txn(1)))
                assert await wait_until_async(lambda: sink.waiting == 1, 10)
                now[0] += 2.5  # the POS has given up on this copy and resends it
                sink.gate.set()
                line.send(frame(txn(1)) + b"junk")
                # the late answer to the first copy is withheld: one ACK (the resend), then the NAK
                assert await line.answers(until=N) == A + N
                assert len(stored_events(outbox.path)) == 1

    asyncio.run(main())


def test_device_that_disappears_is_reopened_and_a_cut_frame_discarded(tmp_path: Path, outbox: Outbox) -> None:
    async def main() -> None:
        health = HealthBoard()
        first, second = Line(), Line()
        link = tmp_path / "ttyPOS"
        link.symlink_to(first.path)
        try:
            async with running(str(link), outbox, health):
                first.send(frame(txn(1)))
                assert await first.answers() == A
                first.send(frame(txn(2))[:10])  # cut off: the device goes away mid-frame
                assert await wait_until_async(lambda: first.unread() == 0, 10)
                os.close(first.master)
                assert await wait_until_async(lambda: not device_up(health), 10)
                link.unlink()
                link.symlink_to(second.path)  # plugged back in (on another pty)
                assert await wait_until_async(lambda: device_up(health), 10)
                second.send(frame(txn(3)))
                assert await second.answers() == A  # no NAK: the cut frame died with the old line
                assert [e["data"]["txn_id"] for e in stored_events(outbox.path)] == ["R1-000001", "R1-000003"]
        finally:
            first.close()
            second.close()

    asyncio.run(main())
