"""Receipt text out of an ESC/POS byte stream (contract section 4.2).

The agent sits on the printer line and reads what the POS prints. `ReceiptParser` is pure and
incremental: it takes the stream in chunks of any size and hands back one `Receipt` per paper
cut. Every command of Epson's ESC/POS reference that prints no text is skipped by its exact
length, including the ones whose payload can hold any byte (raster images, QR/PDF417 data,
length-prefixed barcodes, NV graphics), so image or barcode bytes never leak into the text.
Large payloads are skipped as they stream past, never buffered.

Text: in Chinese mode (`FS &`, the power-on default of the Chinese models a multibyte
`encoding` implies) bytes are decoded with the configured multibyte encoding; outside it
(`FS .`) with the single-byte code page that `ESC t` selects (PC437 at power-on, or the
configured encoding when that is single-byte). Each LF ends a line; blank lines are kept as "",
trailing whitespace is stripped; paper feeds (`ESC d`, `ESC J`, `ESC e`, FF) end a pending line
but add no blank lines; CR is ignored (Epson: ignored unless auto line feed is on, and CRLF is
what POS software sends).

Decisions where the reference leaves room:
- A cut (`GS V`, and the older `ESC i` / `ESC m`) ends the receipt; a cut with no text since
  the previous one (only blank lines, or nothing) makes no receipt.
- Text not ended by LF before a cut still counts as the receipt's last line.
- `ESC @` empties the print buffer like the printer does: an unfinished line is dropped, and the
  code page and Chinese mode go back to their defaults.
- A line that holds only a column-format bit image (`ESC *`, printed with the next LF, as
  escpos-php does for logos) is kept as "": the LF ended a line on paper, and section 4.2 keeps
  every line an LF ends (the image itself is never text).
- An unknown ESC/GS/FS command skips the two command bytes. Nothing but a bad `encoding` or a
  bad field pattern raises: random bytes produce some text, never an exception.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

__all__ = [
    "EscposDecoded",
    "EscposError",
    "Receipt",
    "ReceiptLines",
    "ReceiptParser",
    "check_encoding",
    "compile_patterns",
    "decode_escpos",
    "extract_fields",
    "extract_receipts",
]


class EscposError(ValueError):
    """A setting the parser cannot work with (unknown encoding, bad field regex)."""


@dataclass(slots=True)
class Receipt:
    """The text of one receipt: everything printed between two paper cuts."""

    lines: list[str] = field(default_factory=list)


class ReceiptLines(TypedDict):
    lines: list[str]


class EscposDecoded(TypedDict):
    """The `decode escpos` object (contract section 4.2)."""

    receipts: list[ReceiptLines]


NUL, HT, LF, FF, CR, DLE, CAN, ESC, FS, GS = 0x00, 0x09, 0x0A, 0x0C, 0x0D, 0x10, 0x18, 0x1B, 0x1C, 0x1D
EOT, ENQ, DC4 = 0x04, 0x05, 0x14

# Encodings that are ASCII-compatible with multibyte characters whose bytes never fall into
# 0x00-0x1F, so control codes cannot hide inside a character.
_MULTIBYTE = frozenset(
    {"gb18030", "gbk", "gb2312", "big5", "big5hkscs", "cp950", "cp932", "shift_jis", "euc_jp",
     "euc_kr", "cp949", "johab", "utf-8", "shift_jis_2004", "shift_jisx0213", "euc_jis_2004",
     "euc_jisx0213"}
)  # fmt: skip
_DEFAULT_SINGLE_BYTE = "cp437"  # ESC t 0, the power-on code page
_DEFAULT_CHINESE = "gb18030"

# ESC t n -> Python codec (Epson "character code tables"). The Thai pages are approximated by
# cp874; pages Python has no codec for (Katakana, PC851, PC853, TCVN-3, ...) keep the current
# page, as a printer ignores a table it does not have.
_CODE_PAGES = {
    0: "cp437", 2: "cp850", 3: "cp860", 4: "cp863", 5: "cp865", 13: "cp857", 14: "cp737", 15: "iso8859_7", 16: "cp1252", 17: "cp866",
    18: "cp852", 19: "cp858", 20: "cp874", 21: "cp874", 22: "cp874", 23: "cp874", 24: "cp874",
    25: "cp874", 26: "cp874", 32: "cp720", 33: "cp775", 34: "cp855", 35: "cp861", 36: "cp862",
    37: "cp864", 38: "cp869", 39: "iso8859_2", 40: "iso8859_15", 44: "cp1125", 45: "cp1250",
    46: "cp1251", 47: "cp1253", 48: "cp1254", 49: "cp1255", 50: "cp1256", 51: "cp1257",
    52: "cp1258", 53: "kz1048",
}  # fmt: skip

# Text bytes: printable ASCII and everything from 0x80 (code page or multibyte characters).
_TEXT_RUN = re.compile(rb"[\x20-\x7e\x80-\xff]+")

# Fixed total lengths of ESC commands, by the byte after ESC.
_ESC_FIXED = {
    0x0C: 2, 0x20: 3, 0x21: 3, 0x24: 4, 0x25: 3, 0x2D: 3, 0x32: 2, 0x33: 3, 0x3C: 2, 0x3D: 3,
    0x3F: 3, 0x45: 3, 0x47: 3, 0x4C: 2, 0x4D: 3, 0x52: 3, 0x53: 2, 0x54: 3, 0x55: 3, 0x56: 3,
    0x57: 10, 0x5C: 4, 0x61: 3, 0x63: 4, 0x66: 4, 0x71: 2, 0x70: 5, 0x72: 3, 0x75: 3, 0x76: 2,
    0x7A: 3, 0x7B: 3,
}  # fmt: skip
_ESC_FEEDS = {0x4A: 3, 0x4B: 3, 0x64: 3, 0x65: 3}  # ESC J, ESC K, ESC d, ESC e: print and feed
_ESC_CUTS = {0x69: 2, 0x6D: 2}  # ESC i, ESC m: partial cut (obsolete, still sent)
_GS_FIXED = {
    0x21: 3, 0x24: 4, 0x2F: 3, 0x3A: 2, 0x42: 3, 0x45: 3, 0x48: 3, 0x49: 3, 0x4C: 4, 0x50: 4,
    0x54: 3, 0x57: 4, 0x5A: 3, 0x5C: 4, 0x5E: 5, 0x61: 3, 0x62: 3, 0x63: 2, 0x66: 3, 0x67: 6,
    0x68: 3, 0x6A: 3, 0x72: 3, 0x77: 3, 0x7A: 5,
}  # fmt: skip
_FS_FIXED = {0x21: 3, 0x2D: 3, 0x3F: 4, 0x43: 3, 0x49: 3, 0x53: 4, 0x57: 3, 0x70: 4}
_GS_V_WITH_FEED = frozenset({65, 66, 97, 98, 103, 104})  # GS V m n; m 0/1/48/49 have no n
_FS_2_DATA = 72  # user-defined Kanji: 24 x 24 dots, column format
_NUL_SEARCH = 256  # GS k m d... NUL: longest data any of those barcodes can hold, plus NUL


def _le16(buf: bytearray, i: int) -> int:
    return buf[i] | buf[i + 1] << 8


def check_encoding(encoding: str) -> tuple[str, bool]:
    """(codec name, multibyte) of an encoding the parser can read; EscposError otherwise."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise EscposError(f"unknown encoding {encoding!r}") from None
    sample = "AZaz09 .\n"
    try:
        ascii_safe = sample.encode(name) == sample.encode("ascii")
    except (UnicodeError, LookupError):
        ascii_safe = False
    if not ascii_safe or name.startswith(("iso2022", "hz", "utf-16", "utf-32", "utf_16", "utf_32")):
        raise EscposError(f"encoding {encoding!r} is not ASCII-compatible; ESC/POS text must be")
    return name, name in _MULTIBYTE


class ReceiptParser:
    """Incremental ESC/POS stream reader: `feed` chunks, get receipts at each cut."""

    def __init__(self, encoding: str = "gb18030") -> None:
        name, multibyte = check_encoding(encoding)
        self.encoding = name
        self._chinese_codec = name if multibyte else _DEFAULT_CHINESE
        self._default_single = _DEFAULT_SINGLE_BYTE if multibyte else name
        self._default_chinese = multibyte
        self._buf = bytearray()
        self._skip = 0  # payload bytes of a skipped command still to come
        self._udc_left = 0  # ESC &: user-defined characters still to come
        self._udc_y = 0
        self._nv_left = 0  # FS q: NV bit images still to come
        self._lines: list[str] = []
        self._parts: list[str] = []  # decoded pieces of the current line
        self._raw = bytearray()  # undecoded bytes of the current line, in self._codec
        self._reset_modes()

    # --- public ---------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> list[Receipt]:
        """Take the next bytes of the stream; return the receipts that a cut in them completed."""
        out: list[Receipt] = []
        if chunk:
            self._buf += chunk
            self._parse(out)
        return out

    def flush(self) -> list[Receipt]:
        """End of stream: the text after the last cut, as a receipt if there is any."""
        out: list[Receipt] = []
        self._buf.clear()  # an unfinished command prints nothing
        self._skip = self._udc_left = self._nv_left = 0
        self._cut(out)
        return out

    # --- text state -------------------------------------------------------------------------

    def _reset_modes(self) -> None:
        self._chinese = self._default_chinese
        self._single = self._default_single
        self._codec = self._chinese_codec if self._chinese else self._single

    def _switch_codec(self) -> None:
        codec = self._chinese_codec if self._chinese else self._single
        if codec != self._codec:
            self._flush_raw()
            self._codec = codec

    def _flush_raw(self) -> None:
        if self._raw:
            self._parts.append(self._raw.decode(self._codec, errors="replace"))
            self._raw.clear()

    def _pending_text(self) -> bool:
        return bool(self._raw or self._parts)

    def _end_line(self) -> None:
        self._flush_raw()
        self._lines.append("".join(self._parts).rstrip())
        self._parts.clear()

    def _feed_paper(self) -> None:
        if self._pending_text():
            self._end_line()

    def _cut(self, out: list[Receipt]) -> None:
        if self._pending_text():
            self._end_line()
        if any(self._lines):
            out.append(Receipt(lines=self._lines))
        self._lines = []

    def _initialize(self) -> None:
        self._raw.clear()
        self._parts.clear()
        self._reset_modes()

    # --- the byte loop ------------------------------------------------------------------------

    def _parse(self, out: list[Receipt]) -> None:
        buf = self._buf
        n = len(buf)
        i = 0
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                i += take
                self._skip -= take
                continue
            if self._udc_left:
                self._skip = self._udc_y * buf[i]  # x, then y * x bytes of dots
                self._udc_left -= 1
                i += 1
                continue
            if self._nv_left:
                if n - i < 4:
                    break
                self._skip = _le16(buf, i) * _le16(buf, i + 2) * 8
                self._nv_left -= 1
                i += 4
                continue
            b = buf[i]
            if b >= 0x20 and b != 0x7F:
                match = _TEXT_RUN.match(buf, i)
                assert match is not None
                self._raw += match.group()
                i = match.end()
                continue
            if b == LF:
                self._end_line()
                i += 1
                continue
            if b in (ESC, GS, FS, DLE):
                length = self._command(buf, i, n, out)
                if length is None:
                    break  # wait for the rest of the command
                if i + length > n:
                    self._skip = i + length - n
                    i = n
                else:
                    i += length
                continue
            if b == HT:
                self._raw += b"\t"
            elif b == FF:
                self._feed_paper()
            # CR, CAN, NUL, DEL and other control bytes print nothing
            i += 1
        del buf[:i]

    def _command(self, buf: bytearray, i: int, n: int, out: list[Receipt]) -> int | None:
        """Length of the command at i (acting on it), or None while its header is incomplete."""
        if n - i < 2:
            return None
        lead, c = buf[i], buf[i + 1]
        if lead == ESC:
            return self._esc(buf, i, n, c, out)
        if lead == GS:
            return self._gs(buf, i, n, c, out)
        if lead == FS:
            return self._fs(buf, i, n, c)
        return self._dle(buf, i, n, c)

    def _esc(self, buf: bytearray, i: int, n: int, c: int, out: list[Receipt]) -> int | None:
        length = _ESC_FIXED.get(c)
        if length is not None:
            return length
        if c == 0x40:  # ESC @
            self._initialize()
            return 2
        if c == 0x74:  # ESC t n: select character code table
            if n - i < 3:
                return None
            page = _CODE_PAGES.get(buf[i + 2])
            if page is not None:
                self._single = page
                self._switch_codec()
            return 3
        if c in _ESC_FEEDS:
            if n - i < 3:
                return None
            self._feed_paper()
            return 3
        if c in _ESC_CUTS:
            self._cut(out)
            return 2
        if c == 0x2A:  # ESC * m nL nH d1...dk: bit image, printed with the line
            if n - i < 5:
                return None
            dots = _le16(buf, i + 3)
            return 5 + (dots * 3 if buf[i + 2] in (32, 33) else dots)
        if c == 0x28:  # ESC ( fn pL pH ...
            if n - i < 5:
                return None
            return 5 + _le16(buf, i + 3)
        if c == 0x26:  # ESC & y c1 c2 [x d1...d(y*x)]...
            if n - i < 5:
                return None
            self._udc_y = buf[i + 2]
            self._udc_left = max(0, buf[i + 4] - buf[i + 3] + 1)
            return 5
        if c == 0x44:  # ESC D n1...nk NUL: tab stops, at most 32
            end = buf.find(b"\x00", i + 2, i + 2 + 33)
            if end >= 0:
                return end - i + 1
            return None if n - i < 2 + 33 else 2 + 32
        return 2  # unknown ESC command

    def _gs(self, buf: bytearray, i: int, n: int, c: int, out: list[Receipt]) -> int | None:
        length = _GS_FIXED.get(c)
        if length is not None:
            return length
        if c == 0x56:  # GS V m [n]: cut
            if n - i < 3:
                return None
            if buf[i + 2] in _GS_V_WITH_FEED:
                if n - i < 4:
                    return None
                length = 4
            else:
                length = 3
            self._cut(out)
            return length
        if c == 0x28:  # GS ( fn pL pH ...: QR/PDF417 (k), graphics (L), and the rest
            if n - i < 5:
                return None
            return 5 + _le16(buf, i + 3)
        if c == 0x38:  # GS 8 fn p1 p2 p3 p4 ...: the 32-bit length form of GS ( L / GS ( Q
            if n - i < 7:
                return None
            return 7 + int.from_bytes(buf[i + 3 : i + 7], "little")
        if c == 0x6B:  # GS k: barcode
            if n - i < 3:
                return None
            m = buf[i + 2]
            if m <= 6:  # GS k m d1...dk NUL
                end = buf.find(b"\x00", i + 3, i + 3 + _NUL_SEARCH)
                if end >= 0:
                    return end - i + 1
                return None if n - i < 3 + _NUL_SEARCH else 3
            if n - i < 4:
                return None
            return 4 + buf[i + 3]  # GS k m n d1...dn
        if c == 0x76:  # GS v 0 m xL xH yL yH d1...dk: raster bit image
            if n - i < 3:
                return None
            if buf[i + 2] != 0x30:
                return 3
            if n - i < 8:
                return None
            return 8 + _le16(buf, i + 4) * _le16(buf, i + 6)
        if c == 0x2A:  # GS * x y d1...d(x*y*8): define downloaded bit image
            if n - i < 4:
                return None
            return 4 + buf[i + 2] * buf[i + 3] * 8
        if c == 0x51:  # GS Q 0 m xL xH yL yH d...: variable vertical size bit image (columns)
            if n - i < 3:
                return None
            if buf[i + 2] != 0x30:
                return 3
            if n - i < 8:
                return None
            return 8 + _le16(buf, i + 4) * ((_le16(buf, i + 6) + 7) // 8)
        if c == 0x44:  # GS D m fn a kc1 kc2 b c d1...dk: Windows BMP, k from the BMP header
            if n - i < 15:
                return None
            if buf[i + 9 : i + 11] == b"BM":
                return 9 + max(6, int.from_bytes(buf[i + 11 : i + 15], "little"))
            return 9
        if c == 0x43:  # GS C: counter printing
            if n - i < 3:
                return None
            sub = buf[i + 2]
            if sub in (0, 0x30, 2, 0x32):
                return 5
            if sub in (1, 0x31):
                return 9
            if sub == 0x3B:  # GS C ; sa ; sb ; sn ; sr ; sc ;
                pos = i + 2
                for _ in range(5):
                    pos = buf.find(b";", pos + 1, i + 48)
                    if pos < 0:
                        return None if n - i < 48 else 3
                return pos - i + 1
            return 3
        return 2  # unknown GS command

    def _fs(self, buf: bytearray, i: int, n: int, c: int) -> int | None:
        length = _FS_FIXED.get(c)
        if length is not None:
            return length
        if c == 0x26:  # FS &: Chinese (Kanji) mode on
            self._chinese = True
            self._switch_codec()
            return 2
        if c == 0x2E:  # FS .: Chinese mode off
            self._chinese = False
            self._switch_codec()
            return 2
        if c == 0x28:  # FS ( fn pL pH ...
            if n - i < 5:
                return None
            return 5 + _le16(buf, i + 3)
        if c == 0x32:  # FS 2 c1 c2 d1...dk: define user-defined Kanji
            return 4 + _FS_2_DATA
        if c == 0x71:  # FS q n [xL xH yL yH d...]...: define NV bit images
            if n - i < 3:
                return None
            self._nv_left = buf[i + 2]
            return 3
        if c == 0x67:  # FS g 1 m a1 a2 a3 a4 nL nH d... / FS g 2 m a1 a2 a3 a4 nL nH
            if n - i < 3:
                return None
            if buf[i + 2] in (1, 0x31):
                if n - i < 10:
                    return None
                return 10 + _le16(buf, i + 8)
            return 10 if buf[i + 2] in (2, 0x32) else 3
        return 2  # unknown FS command

    def _dle(self, buf: bytearray, i: int, n: int, c: int) -> int | None:
        if c == EOT:  # DLE EOT n [a]
            if n - i < 3:
                return None
            return 4 if buf[i + 2] in (7, 8) else 3
        if c == ENQ:
            return 3
        if c == DC4:  # DLE DC4 fn ...
            if n - i < 3:
                return None
            return {1: 5, 2: 5, 3: 5, 7: 4, 8: 10}.get(buf[i + 2], 3)
        return 1  # a DLE that starts no real-time command is just a control byte


def extract_receipts(data: bytes, encoding: str = "gb18030") -> list[Receipt]:
    """All receipts in a complete ESC/POS byte stream (the last one may lack its cut)."""
    parser = ReceiptParser(encoding)
    return parser.feed(data) + parser.flush()


def decode_escpos(data: bytes, encoding: str = "gb18030") -> EscposDecoded:
    """The `decode escpos` object: `{"receipts": [{"lines": [...]}, ...]}`."""
    return {"receipts": [{"lines": r.lines} for r in extract_receipts(data, encoding)]}


_LIST_FIELDS = frozenset({"coupons"})
_ITEM_FIELDS = frozenset({"items"})


def _match_value(match: re.Match[str]) -> str:
    if "value" in match.re.groupindex and match.group("value") is not None:
        return match.group("value").strip()
    for group in match.groups():
        if group is not None:
            return group.strip()
    return match.group(0).strip()


def compile_patterns(patterns: Mapping[str, str]) -> dict[str, re.Pattern[str]]:
    """Each field's regex compiled (re.MULTILINE); EscposError naming the field for a bad one."""
    compiled = {}
    for key, pattern in patterns.items():
        try:
            compiled[key] = re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise EscposError(f"pattern for {key!r} is not a valid regex: {exc}") from None
    return compiled


def extract_fields(lines: Sequence[str], patterns: Mapping[str, str]) -> dict[str, Any]:
    """Apply per-store regexes to a receipt's lines.

    The patterns run over the lines joined by newlines, with re.MULTILINE (`^`/`$` match at
    each line). `items` gives every match as a dict of its named groups; `coupons` gives every
    match; any other key (`total`, `member_id`, ...) gives its first match or None. A match's
    value is its `value` group, else its first group, else the whole match.
    """
    text = "\n".join(lines)
    fields: dict[str, Any] = {}
    for key, regex in compile_patterns(patterns).items():
        if key in _ITEM_FIELDS:
            fields[key] = [
                {k: (v.strip() if v is not None else None) for k, v in m.groupdict().items()}
                if regex.groupindex
                else {"text": m.group(0).strip()}
                for m in regex.finditer(text)
            ]
        elif key in _LIST_FIELDS:
            fields[key] = [_match_value(m) for m in regex.finditer(text)]
        else:
            match = regex.search(text)
            fields[key] = _match_value(match) if match else None
    return fields
