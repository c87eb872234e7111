"""Latency of the serial drivers: a scanner read to its committed event, and the receipt tap's forwarding.

    /work/main/.venv/bin/python bench/scanner_tap.py [--reads 500] [--chunks 2000] [--dir DIR]

Scanner: the loop itself plays the scanner on a pty master, one read at a time (a GS1-128 read with
AIM prefix and CR LF); the driver runs in the asyncio loop and commits into a real Outbox
(SQLite WAL, synchronous=FULL, fsync'd) in DIR (default: a temporary directory under ./var, on
the real disk). Latency: from the write of the read's last byte to the return of its commit.

Tap: a thread plays the POS and the printer: it writes a chunk to the POS pty and reads it back
from the printer pty. Baseline: the same chunk through one pty with nothing in between. The tap
adds (tap p50 - baseline p50). Chunk sizes 64 (a text line), 512 and 4096 (raster data).

A second scanner run commits into nothing, to show the driver's own share.

Prints p50/p99/max in milliseconds and CPU time per item: the event loop thread's (the driver's
own work, epoll wake-ups included), the outbox writer thread's (encoding, SQLite, fsync) and the
whole process's (for the tap it also counts the thread playing the devices and its GIL hand-offs). Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import statistics
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.buffer import Outbox  # noqa: E402
from agent.config import PosSection, ScannerSection  # noqa: E402
from agent.health import HealthBoard  # noqa: E402
from agent.sink import Committed  # noqa: E402
from bench.machine import print_machine  # noqa: E402
from drivers.receipt_tap import ReceiptTap  # noqa: E402
from drivers.scanner import ScannerDriver  # noqa: E402

READ = b"]C1010950110153000317140704\x1d10AB-123\r\n"


def pty() -> tuple[int, int, str]:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


def read_exactly(fd: int, n: int, timeout: float = 5.0) -> bytes:
    out = bytearray()
    while len(out) < n:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"got {len(out)} of {n} bytes")
        out += os.read(fd, n - len(out))
    return bytes(out)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def line(label: str, ms: list[float], cpu: str) -> str:
    return (
        f"{label:<38} p50 {statistics.median(ms):6.3f} ms  p99 {pct(ms, 99):6.3f} ms  "
        f"max {max(ms):6.3f} ms  CPU/item {cpu}"
    )


def thread_cpu(thread: threading.Thread | None) -> float:
    """CPU seconds a thread has used so far (0 for none)."""
    if thread is None or thread.ident is None:
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


class TimedSink:
    """The outbox (or, with None, nothing: the driver's own cost), timing each commit's return."""

    def __init__(self, outbox: Outbox | None) -> None:
        self.outbox = outbox
        self.done = asyncio.Event()
        self.t_done = 0.0

    async def commit(self, events, dedup=None):  # type: ignore[no-untyped-def]
        result = await self.outbox.commit(events, dedup) if self.outbox else Committed()
        self.t_done = time.perf_counter()
        self.done.set()
        return result

    def offer(self, event) -> None:  # type: ignore[no-untyped-def]
        pass


async def bench_scanner(n: int, data_dir: Path | None) -> None:
    outbox = Outbox(data_dir / "scanner.db").start() if data_dir else None
    master, slave, path = pty()
    sink = TimedSink(outbox)
    driver = ScannerDriver(ScannerSection(name="bench", port=path), sink, HealthBoard())  # type: ignore[arg-type]
    task = asyncio.create_task(driver.run())
    while not driver.up:
        await asyncio.sleep(0.01)
    latencies: list[float] = []
    writer = outbox._thread if outbox else None
    warmup = 20
    for i in range(n + warmup):
        if i == warmup:
            cpu0, loop0, writer0 = time.process_time(), time.thread_time(), thread_cpu(writer)
        sink.done.clear()
        os.write(master, READ[:-8])
        await asyncio.sleep(0.0005)  # the rest of the read a moment later, as a UART delivers it
        t0 = time.perf_counter()
        os.write(master, READ[-8:])
        await asyncio.wait_for(sink.done.wait(), 5)
        if i >= warmup:
            latencies.append((sink.t_done - t0) * 1000)
    # the scanner is played from the loop thread itself, so no thread hand-offs blur the figure
    loop_us = (time.thread_time() - loop0) / n * 1e6
    writer_us = (thread_cpu(writer) - writer0) / n * 1e6
    total_us = (time.process_time() - cpu0) / n * 1e6
    cpu = f"driver {loop_us:.0f} us, buffer writer {writer_us:.0f} us, process {total_us:.0f} us"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if outbox is not None:
        outbox.close()
    os.close(master)
    os.close(slave)
    label = f"scanner read -> committed ({n})" if outbox else f"scanner read -> sink, no buffer ({n})"
    print(line(label, latencies, cpu))


async def bench_tap(n: int, sizes: list[int]) -> None:
    pos_m, pos_s, pos_path = pty()
    prn_m, prn_s, prn_path = pty()
    base_m, base_s, _ = pty()
    with tempfile.TemporaryDirectory() as tmp:
        outbox = Outbox(Path(tmp) / "tap.db").start()
        cfg = PosSection(name="bench", port=pos_path, protocol="escpos", forward_to=prn_path)
        tap = ReceiptTap(cfg, outbox, HealthBoard())
        task = asyncio.create_task(tap.run())
        while not (tap.pos.alive and tap.printer is not None and tap.printer.alive):
            await asyncio.sleep(0.01)
        for size in sizes:
            # text-ish bytes with a LF now and then, so the parser does real work on the way
            chunk = (b"6901234567892   1 x 12.50   12.50\n" * (size // 34 + 1))[:size]

            def run(write_fd: int, read_fd: int, chunk: bytes = chunk, size: int = size) -> list[float]:
                out: list[float] = []
                for i in range(n + 50):
                    t0 = time.perf_counter()
                    os.write(write_fd, chunk)
                    read_exactly(read_fd, size)
                    if i >= 50:
                        out.append((time.perf_counter() - t0) * 1000)
                return out

            base = await asyncio.to_thread(run, base_m, base_s)
            loop0, cpu0 = time.thread_time(), time.process_time()
            through = await asyncio.to_thread(run, pos_m, prn_m)
            tap_us = (time.thread_time() - loop0) / (n + 50) * 1e6  # the loop thread: the tap's work
            total_us = (time.process_time() - cpu0) / (n + 50) * 1e6
            print(line(f"pty alone, {size} B chunks", base, "-"))
            print(
                line(
                    f"through the tap, {size} B chunks",
                    through,
                    f"tap {tap_us:.0f} us, process {total_us:.0f} us",
                )
            )
            print(
                f"{'':<38} added by the tap: p50 {statistics.median(through) - statistics.median(base):.3f} ms"
                f"  p99 {pct(through, 99) - pct(base, 99):.3f} ms"
            )
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        outbox.close()
    for fd in (pos_m, pos_s, prn_m, prn_s, base_m, base_s):
        os.close(fd)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None, help="where the scanner's outbox file goes")
    args = parser.parse_args()
    print_machine()
    base = args.dir or Path("var")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        await bench_scanner(args.reads, Path(tmp))
    await bench_scanner(args.reads, None)
    await bench_tap(args.chunks, [64, 512, 4096])


if __name__ == "__main__":
    try:
        import uvloop  # what the daemon runs on

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
