"""Simulated devices for the demo store, each on the master side of a pseudo-terminal.

The registry opens a pty for every `sim:` port; the driver opens the slave's path like any serial
device and the simulator here drives the master (a non-blocking fd):

- `ScannerSimulator`: a 2D imager on USB-CDC, sending a read now and then with an AIM prefix and
  CR LF: EAN-13, GS1-128 with FNC1, GS1 DataMatrix, a QR pickup code and a GS1 Digital Link QR.
- `PrintingPosSimulator`: a POS that prints GB18030 Chinese receipts in ESC/POS (logo raster,
  Chinese mode, bold, double size, QR code, CODE128 barcode, cash drawer kick, cut), asking the
  printer for its status (DLE EOT 1) before each receipt as POS software does.
- `PrinterSimulator`: a receipt printer that takes everything and answers real-time status
  requests (DLE EOT n) the way an Epson TM does.

Receipt lines match the demo config's `[pos.patterns]` (see `DEMO_PATTERNS`). Products come from
the demo store's one catalogue (`drivers.sim.catalogue`), shared with the stxetx POS simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import time
from dataclasses import dataclass

from drivers.sim.catalogue import CATALOGUE

log = logging.getLogger(__name__)

CRLF = b"\r\n"
GS = b"\x1d"
ESC = b"\x1b"
FS = b"\x1c"
DLE_EOT = b"\x10\x04"

# Per-store regexes that pull fields out of the simulated receipts (for [[pos]] patterns).
DEMO_PATTERNS = {
    "total": r"(?:合计|总计|TOTAL)\s*[:：]?\s*(?P<total>[0-9]+\.[0-9]{2})",
    "member_id": r"(?:会员|MEMBER)\s*[:：]?\s*(?P<member_id>[0-9A-Za-z]+)",
    "coupons": r"^优惠券\s*[:：]\s*(?P<coupon>\S+)",
    "items": r"^(?P<gtin>[0-9]{8,14})\s+(?P<qty>[0-9]+)\s*x\s*(?P<unit_price>[0-9]+\.[0-9]{2})\s+(?P<amount>[0-9]+\.[0-9]{2})$",
}

# An Epson TM answers DLE EOT 1..4 with one byte; 0x12 (fixed bits 1 and 4 set) means online,
# cover closed, paper present, no error.
STATUS_OK = 0x12


async def wait_fd(fd: int, *, write: bool, timeout: float | None = None) -> bool:
    """Wait until `fd` is readable (or writable); False on timeout."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    try:
        async with asyncio.timeout(timeout):
            await fut
        return True
    except TimeoutError:
        return False
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def write_all(fd: int, data: bytes, chunk: int = 4096) -> None:
    """Write every byte to a non-blocking fd, waiting while the pty's buffer is full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[:chunk])
        except BlockingIOError:
            await wait_fd(fd, write=True)
            continue
        view = view[n:]


# --- scanner ----------------------------------------------------------------------------------


def scanner_reads(rng: random.Random) -> list[bytes]:
    """One of each kind of read a store's imager sends, AIM prefix and CR LF included."""
    product = rng.choice(CATALOGUE)
    gtin, gtin14 = product.gtin, product.gtin14
    expiry = f"{rng.randint(26, 28)}{rng.randint(1, 12):02d}{rng.choice([0, 15, 28]):02d}"
    batch = f"L{rng.randint(1000, 9999)}"
    weight_g = rng.randint(150, 2500)
    serial = f"SN{rng.randint(100000, 999999)}"
    pickup = f"PK{rng.randint(100000, 999999)}"
    gs = GS.decode()
    return [
        f"]E0{gtin}".encode(),
        # GS1-128: GTIN, expiry, batch (variable length, so FNC1 after it), net weight in kg, 3 decimals
        f"]C101{gtin14}17{expiry}10{batch}{gs}3103{weight_g:06d}".encode(),
        f"]d201{gtin14}21{serial}{gs}17{expiry}10{batch}".encode(),
        f"]Q1{pickup}".encode(),
        f"]Q1https://id.gs1.org/01/{gtin14}/10/{batch}?17={expiry}".encode(),
    ]


class ScannerSimulator:
    """A barcode imager on a pty master: a read every `interval_s` (random in the range)."""

    def __init__(
        self, master_fd: int, interval_s: tuple[float, float] = (3.0, 10.0), rng: random.Random | None = None
    ) -> None:
        self.fd = master_fd
        self.interval_s = interval_s
        self.rng = rng or random.Random()
        self.sent = 0

    async def send(self, read: bytes) -> None:
        """Send one read (terminator added) the way USB-CDC does: 64-byte packets."""
        await write_all(self.fd, read + CRLF, chunk=64)
        self.sent += 1

    async def run(self) -> None:
        """Send reads until cancelled."""
        while True:
            await asyncio.sleep(self.rng.uniform(*self.interval_s))
            try:
                await self.send(self.rng.choice(scanner_reads(self.rng)))
            except OSError as exc:  # the driver side closed: keep going, a scanner does not care
                log.debug("scanner simulator: write failed: %s", exc)


# --- POS that prints ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    gtin: str
    name: str
    qty: int
    unit_fen: int


def _money(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _logo(width_bytes: int = 24, height: int = 32) -> bytes:
    """A raster logo (a framed diamond) for GS v 0; its bytes avoid the DLE EOT pattern."""
    rows = []
    mid = height // 2
    for y in range(height):
        reach = mid - abs(y - mid)
        row = bytearray(width_bytes)
        row[0] = row[-1] = 0xFF if y in (0, height - 1) else 0x80
        for x in range(width_bytes // 2 - reach // 2, width_bytes // 2 + reach // 2):
            row[x] = 0x7E
        rows.append(bytes(row))
    data = b"".join(rows)
    return GS + b"v0\x00" + bytes([width_bytes, 0, height, 0]) + data


def _qr(data: bytes) -> bytes:
    store = len(data) + 3
    return (
        GS
        + b"(k\x04\x001A2\x00"  # model 2
        + GS
        + b"(k\x03\x001C\x06"  # module size 6
        + GS
        + b"(k\x03\x001E1"  # error correction M
        + GS
        + b"(k"
        + bytes([store & 0xFF, store >> 8])
        + b"1P0"
        + data  # store the data
        + GS
        + b"(k\x03\x001Q0"  # print it
    )


def _code128(data: bytes) -> bytes:
    return GS + b"h\x50" + GS + b"w\x02" + GS + b"H\x02" + GS + b"kI" + bytes([len(data)]) + data


def receipt_bytes(
    number: int,
    lines: list[Line],
    member_id: str | None,
    coupon: str | None,
    when: float,
    register: str = "R2",
) -> bytes:
    """The ESC/POS bytes a Chinese POS sends for one receipt (GB18030, 48 columns)."""

    def text(s: str) -> bytes:
        return s.encode("gb18030") + b"\n"

    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    total = sum(line.qty * line.unit_fen for line in lines)
    out = bytearray()
    out += ESC + b"@" + FS + b"&"  # initialise, Chinese mode on
    out += ESC + b"a\x01" + _logo() + b"\n"
    out += ESC + b"E\x01" + GS + b"!\x11" + text("鲜丰便利店（南京西路店）") + GS + b"!\x00" + ESC + b"E\x00"
    out += text("上海市静安区南京西路1234号")
    out += text("电话：021-6234 5678")
    out += ESC + b"a\x00"
    out += text(f"单号：{register}-{number:06d}    收银员：07")
    out += text(f"日期：{stamp}")
    out += text("-" * 48)
    out += text("商品条码          数量   单价      金额")
    for line in lines:
        out += text(line.name)
        out += text(
            f"{line.gtin}   {line.qty} x {_money(line.unit_fen)}   {_money(line.qty * line.unit_fen)}"
        )
    out += text("-" * 48)
    out += ESC + b"E\x01" + text(f"合计：{_money(total)}") + ESC + b"E\x00"
    out += text(f"件数：{sum(line.qty for line in lines)}")
    if member_id:
        out += text(f"会员：{member_id}")
    if coupon:
        out += text(f"优惠券：{coupon}")
    out += text("支付方式：微信支付")
    out += b"\n"
    out += ESC + b"a\x01" + _qr(f"https://fapiao.example.cn/{register}/{number:06d}".encode()) + b"\n"
    out += text("扫码开具电子发票")
    out += _code128(f"{{B{register}{number:06d}".encode()) + b"\n"
    out += FS + b"." + b"Thank you, welcome back!\n" + FS + b"&"  # an English line outside Chinese mode
    out += text("谢谢惠顾  欢迎再次光临")
    out += ESC + b"p\x00\x19\xfa"  # kick the cash drawer
    out += ESC + b"d\x04" + GS + b"VB\x00"  # feed 4 lines, partial cut
    return bytes(out)


class PrintingPosSimulator:
    """A POS that prints receipts on a pty master, `rate_per_min` of them a minute on average."""

    def __init__(
        self,
        master_fd: int,
        rate_per_min: float,
        register: str = "R2",
        rng: random.Random | None = None,
        status_timeout_s: float = 1.0,
    ) -> None:
        self.fd = master_fd
        self.rate_per_min = rate_per_min
        self.register = register
        self.rng = rng or random.Random()
        self.status_timeout_s = status_timeout_s
        self.number = 0
        self.statuses: list[int] = []  # status bytes the printer sent back

    def next_receipt(self) -> bytes:
        """The bytes of the next receipt, with a random basket."""
        self.number += 1
        picks = self.rng.sample(CATALOGUE, self.rng.randint(1, 4))
        lines = [Line(p.gtin, p.name, self.rng.randint(1, 3), p.fen) for p in picks]
        member = f"88{self.rng.randint(10**7, 10**8 - 1)}" if self.rng.random() < 0.6 else None
        coupon = self.rng.choice(["MJ-20OFF", "NEW-5", None, None])
        return receipt_bytes(self.number, lines, member, coupon, time.time(), self.register)

    async def ask_status(self) -> int | None:
        """DLE EOT 1 (printer status); the reply byte, or None if the printer does not answer."""
        self._drain_replies()
        await write_all(self.fd, DLE_EOT + b"\x01")
        deadline = time.monotonic() + self.status_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not await wait_fd(self.fd, write=False, timeout=left):
                break
            replies = self._drain_replies()
            if replies:
                return replies[-1]
        return None

    def _drain_replies(self) -> bytes:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EIO:  # nobody has the slave open yet
                return b""
            raise
        self.statuses.extend(data)
        return data

    async def print_receipt(self) -> bytes:
        """Ask for status, then print one receipt; returns the bytes sent."""
        status = await self.ask_status()
        if status is None:
            log.debug("printing POS simulator: printer did not answer DLE EOT; printing anyway")
        data = self.next_receipt()
        await write_all(self.fd, data, chunk=512)
        return data

    async def run(self) -> None:
        """Print receipts until cancelled (exponential gaps, as customers arrive)."""
        if self.rate_per_min <= 0:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(self.rng.expovariate(self.rate_per_min / 60.0))
            try:
                await self.print_receipt()
            except OSError as exc:
                log.debug("printing POS simulator: write failed: %s", exc)


# --- printer ------------------------------------------------------------------------------------


class PrinterSimulator:
    """A receipt printer on a pty master: swallows the print stream, answers DLE EOT n.

    Like a real printer with real-time commands enabled, it reacts to the DLE EOT pattern wherever
    it appears in the stream, even inside image data (Epson warns about exactly this).
    """

    def __init__(self, master_fd: int) -> None:
        self.fd = master_fd
        self.received = 0
        self.cuts = 0
        self._tail = b""

    def _replies(self, data: bytes) -> bytes:
        window = self._tail + data
        out = bytearray()
        start = 0
        while (i := window.find(DLE_EOT, start)) >= 0 and i + 2 < len(window):
            if window[i + 2] in (1, 2, 3, 4):
                out.append(STATUS_OK)
                start = i + 3
            else:  # not a status request: its third byte may start one
                start = i + 2
        keep = max(start, len(window) - 2)
        self._tail = window[keep:]
        self.cuts += data.count(GS + b"V")
        return bytes(out)

    async def run(self) -> None:
        """Drain and answer until cancelled."""
        while True:
            await wait_fd(self.fd, write=False)
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                await asyncio.sleep(0.2)  # nobody has the slave open: a printer just waits
                continue
            self.received += len(data)
            reply = self._replies(data)
            if reply:
                with contextlib.suppress(OSError):
                    await write_all(self.fd, reply)
