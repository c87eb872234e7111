"""Throughput of the pure byte parsers (BLE adverts, scanner reads, ESC/POS receipts).

Run: .venv/bin/python bench/parsers.py [--seconds 0.5]

Prints, per parser, items per second (wall clock) and CPU microseconds per item
(time.process_time), plus bytes per second where bytes are what matters. Never asserts a time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.protocols.ble import frames_from_ad, frames_from_bleak  # noqa: E402
from agent.protocols.escpos import ReceiptParser  # noqa: E402
from agent.protocols.scan import ScanFramer, decode_scan  # noqa: E402
from bench.machine import print_machine  # noqa: E402

ESC, GS, FS = b"\x1b", b"\x1d", b"\x1c"

ADVERTS = [
    bytes.fromhex("02011a1aff4c000215" + "83256b7478d043a4826905f9dc8a44ba" + "00100020c6"),  # iBeacon
    bytes.fromhex("02011a1bff1801beac" + "00" * 16 + "00010001c501"),  # AltBeacon
    bytes.fromhex("0201060303aafe1716aafe00e3" + "12345678901234678901" + "000000000001" + "0000"),
    b"\x03\x03\xaa\xfe\x13\x16\xaa\xfe\x10\xf8\x03github\x00citruz",  # Eddystone-URL
    bytes.fromhex("0201060303aafe1116aafe20000b1813000000146700 2ac4e4".replace(" ", "")),  # TLM
    bytes.fromhex("0201060bff4c001006071e8b3a0d19") + b"\x05\x09Till",  # phone: no beacon frame
]

READS = [
    b"]C1010950110153000317140704\x1d10AB-123\r\n",
    b"]E05901234123457\r\n",
    b"]d2\x1d01034531200000111712050810ABCD1234\x1d4109501101020917\r\n",
    b"]Q1https://id.gs1.org/01/09506000134352/10/ABC1?17=261100\r\n",
    b"PICKUP-4821\r\n",
    b"]C0SKU-000123\r\n",
]


def gb(text: str) -> bytes:
    return text.encode("gb18030")


def receipt(with_images: bool) -> bytes:
    """A supermarket receipt: 30 item lines, optionally a 384x96 logo and a QR code."""
    out = bytearray(ESC + b"@" + ESC + b"a\x01")
    if with_images:
        out += GS + b"v0\x00" + (48).to_bytes(2, "little") + (96).to_bytes(2, "little") + bytes(48 * 96)
    out += GS + b"!\x11" + gb("某某便利店") + b"\n" + GS + b"!\x00" + ESC + b"a\x00"
    for n in range(30):
        out += gb(f"商品{n:02d} 农夫山泉550ml     2   2.00   4.00") + b"\n"
    out += ESC + b"E\x01" + gb("合计:               120.00") + ESC + b"E\x00\n"
    out += GS + b"k\x02" + b"6901234567892\x00"
    if with_images:
        store = b"1P0https://e.example.com/r/R1-000123"
        out += GS + b"(k" + len(store).to_bytes(2, "little") + store + GS + b"(k\x03\x001Q0"
    out += ESC + b"d\x04" + GS + b"VB\x00"
    return bytes(out)


def measure(name: str, run: Callable[[], int], seconds: float, nbytes: int = 0) -> None:
    """Call run() (which processes some items and returns how many) until `seconds` pass."""
    items = 0
    calls = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while True:
        items += run()
        calls += 1
        wall = time.perf_counter() - wall0
        if wall >= seconds:
            break
    cpu = time.process_time() - cpu0
    line = f"{name:<34} {items / wall:>12,.0f} items/s   {cpu / items * 1e6:>9.2f} µs CPU/item"
    if nbytes:
        line += f"   {nbytes * calls / wall / 1e6:>8.1f} MB/s"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per parser (default 0.5)")
    seconds = parser.parse_args().seconds
    print_machine()

    def ble_ad() -> int:
        for ad in ADVERTS:
            frames_from_ad(ad)
        return len(ADVERTS)

    manufacturer = {0x004C: ADVERTS[0][7:]}  # after flags, AD header and company id
    service = {"0000feaa-0000-1000-8000-00805f9b34fb": ADVERTS[4][11:]}

    def ble_bleak() -> int:
        frames_from_bleak(manufacturer, service)
        return 1

    def scan() -> int:
        for read in READS:
            decode_scan(read)
        return len(READS)

    stream = b"".join(READS) * 50
    chunks = [stream[k : k + 64] for k in range(0, len(stream), 64)]

    def framer() -> int:
        f = ScanFramer("auto")
        return sum(len(f.feed(c)) for c in chunks)

    text_receipt, image_receipt = receipt(False), receipt(True)

    def escpos(data: bytes) -> Callable[[], int]:
        pieces = [data[k : k + 256] for k in range(0, len(data), 256)]  # serial-sized reads

        def run() -> int:
            p = ReceiptParser("gb18030")
            return sum(len(p.feed(c)) for c in pieces)

        return run

    print(f"python {sys.version.split()[0]}, {seconds} s per parser")
    measure("ble frames_from_ad (advert)", ble_ad, seconds)
    measure("ble frames_from_bleak (advert)", ble_bleak, seconds)
    measure("scan decode_scan (read)", scan, seconds)
    measure("scan ScanFramer 64 B chunks (read)", framer, seconds, len(stream))
    measure("escpos text receipt (receipt)", escpos(text_receipt), seconds, len(text_receipt))
    measure("escpos receipt+logo+QR (receipt)", escpos(image_receipt), seconds, len(image_receipt))


if __name__ == "__main__":
    main()
