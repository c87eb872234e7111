"""Barcode scanner reads (contract section 5): framing, AIM symbology identifiers and GS1 data.

A read is the bytes a scanner sends for one barcode, ended by CR, LF or CRLF, optionally led by
an AIM symbology identifier (ISO/IEC 15424: `]` + code character + modifier). GS (0x1D) stands
for FNC1. `decode_scan` turns one read into the object of section 5.

biip (the GS1 library) is used for its table of Application Identifiers (formats and regex
patterns) and its check digit and UPC-E code, but not for walking the element string itself:
biip raises on the first bad value (a wrong date, say) and then gives no values at all, while
section 5 wants the raw values kept next to the errors. biip also reads the wall clock to pick a
century for dates; this module never reads the clock.

Decisions where the contract is silent:
- Bytes that are not UTF-8 are decoded as Latin-1 (lossless: the original bytes can be got back
  with `.encode("latin-1")`) and the errors list says so. That note does not make non-GS1 data
  invalid; in GS1 data such characters break the AI format anyway.
- Without an AIM identifier, data is taken as GS1 on positive evidence: a leading or inner GS
  with a known AI in front, `01` followed by 14 digits, all digits of a GTIN's length (8, 12, 13
  or 14), or a GS1 Digital Link URL. Anything else is opaque data (valid, `ai: {}`).
- All digits of a GTIN's length without an AIM identifier are a GTIN, its check digit checked:
  many scanners send no AIM prefix, and a misread EAN-13 must not reach the cloud as valid. An
  internal number of exactly that length with a wrong check digit is reported invalid too; a
  scanner that sends AIM identifiers (`]C0`, `]A0`) keeps such codes opaque.
- `valid` is true for non-GS1 data; for GS1 data it is true only without any error.
"""

from __future__ import annotations

import calendar
import re
from functools import lru_cache
from typing import TypedDict
from urllib.parse import parse_qsl, unquote, urlsplit

from biip import ParseError
from biip.checksums import gs1_standard_check_digit
from biip.gs1_application_identifiers import GS1ApplicationIdentifier
from biip.upc import Upc

from agent.protocols.hextext import parse_hex

__all__ = ["ScanFramer", "ScanParseError", "ScanRead", "decode_scan", "decode_scan_hex"]

GS = "\x1d"


class ScanRead(TypedDict):
    """The `decode scan` object and a `scan.read` event's data (contract section 5)."""

    aim: str | None
    symbology: str | None
    data: str
    gtin: str | None
    ai: dict[str, str]
    valid: bool
    errors: list[str]


class ScanParseError(ValueError):
    """Input that is not a scanner read at all (bad hex, a bad framer setting)."""


# --- AIM symbology identifiers ------------------------------------------------------------

# Code characters of ISO/IEC 15424 table 1, named the way store staff know them.
_AIM_CODE_NAMES = {
    "A": "Code 39", "B": "Telepen", "C": "Code 128", "D": "Code One", "E": "EAN/UPC",
    "F": "Codabar", "G": "Code 93", "H": "Code 11", "I": "ITF", "K": "Code 16K",
    "L": "PDF417", "M": "MSI", "N": "Anker", "O": "Codablock", "P": "Plessey",
    "Q": "QR Code", "R": "Straight 2 of 5", "S": "Straight 2 of 5", "T": "Code 49",
    "U": "MaxiCode", "X": "Other", "Z": "No barcode", "c": "Channel Code", "d": "Data Matrix",
    "e": "GS1 DataBar", "o": "OCR", "p": "PosiCode", "s": "SuperCode", "z": "Aztec",
    "J": "DotCode", "h": "Han Xin",
}  # fmt: skip
# Identifiers whose modifier changes the name (GS1 General Specifications figure 5.1.2-2).
_AIM_NAMES = {
    "]C1": "GS1-128", "]E0": "EAN-13", "]E1": "EAN two-digit add-on",
    "]E2": "EAN five-digit add-on", "]E3": "EAN-13 with add-on", "]E4": "EAN-8",
    "]I1": "ITF-14", "]d2": "GS1 DataMatrix", "]Q3": "GS1 QR Code", "]e0": "GS1 DataBar",
    "]e1": "GS1 Composite", "]e2": "GS1 Composite", "]J1": "GS1 DotCode",
}  # fmt: skip
# Symbologies whose data is a GS1 element string (FNC1 in first position).
_GS1_ELEMENT_STRING_AIMS = frozenset({"]C1", "]d2", "]Q3", "]e0", "]e1", "]e2", "]J1"})
_EAN_AIMS = frozenset({"]E0", "]E3", "]E4"})
_AIM_RE = re.compile(r"\][A-Za-z][0-9A-Za-z]")


def _symbology_name(aim: str) -> str:
    return _AIM_NAMES.get(aim) or _AIM_CODE_NAMES.get(aim[1], "Unknown")


# --- GS1 Application Identifiers ----------------------------------------------------------


@lru_cache(maxsize=8192)
def _ai_at(prefix: str) -> GS1ApplicationIdentifier | None:
    """The AI that the (up to 4 character) prefix starts with; AIs are prefix-free."""
    try:
        return GS1ApplicationIdentifier.extract(prefix)
    except ParseError:
        return None


@lru_cache(maxsize=1024)
def _fixed_length(ai: GS1ApplicationIdentifier) -> int | None:
    """Data length of an AI whose format has no variable part, else None."""
    parts = ai.format.split("+")[1:]
    if any(".." in p or "[" in p or "]" in p for p in parts):
        return None
    try:
        return sum(int(p[1:]) for p in parts)
    except ValueError:
        return None


@lru_cache(maxsize=1024)
def _pattern(ai: GS1ApplicationIdentifier) -> re.Pattern[str]:
    return re.compile(ai.pattern)


# AI -> slice of the value that is a GS1 mod-10 number ending in its check digit.
_CHECK_DIGIT_SPANS = {
    "00": slice(0, 18), "01": slice(0, 14), "02": slice(0, 14), "03": slice(0, 14),
    "253": slice(0, 13), "255": slice(0, 13), "402": slice(0, 17),
    "410": slice(0, 13), "411": slice(0, 13), "412": slice(0, 13), "413": slice(0, 13),
    "414": slice(0, 13), "415": slice(0, 13), "416": slice(0, 13), "417": slice(0, 13),
    "8003": slice(1, 14), "8006": slice(0, 14), "8017": slice(0, 18), "8018": slice(0, 18),
    "8026": slice(0, 14),
}  # fmt: skip
# Dates (YYMMDD at the start of the value). GS1 General Specifications 3.4: for these AIs a day
# of 00 means "the month only", i.e. its last day.
_DAY_ZERO_DATE_AIS = frozenset({"11", "12", "13", "15", "16", "17"})
_OTHER_DATE_AIS = frozenset({"4324", "4325", "4326", "7003", "7006", "7007", "7011", "8008"})
# Where an hour and minute follow the date (YYMMDDHHMM).
_DATE_TIME_AIS = frozenset({"4324", "4325", "7003"})


def _gtin_check_ok(digits: str) -> bool:
    return digits.isdigit() and len(digits) >= 2 and gs1_standard_check_digit(digits[:-1]) == int(digits[-1])


def _date_error(code: str, value: str) -> str | None:
    """Calendar check of a YYMMDD[HHMM] value (the AI pattern only checks digit ranges)."""
    if len(value) < 6 or not value[:6].isdigit():
        return None  # the format check reports it
    yy, mm, dd = int(value[0:2]), int(value[2:4]), int(value[4:6])
    if not 1 <= mm <= 12:
        return f"AI ({code}): month {mm:02d} does not exist"
    if dd == 0:
        if code in _DAY_ZERO_DATE_AIS:
            return None
        return f"AI ({code}): day 00 is only allowed in AIs 11-17"
    # The century is the one within 49 years back and 50 forward (GS1 GS 7.12); in that window
    # every year divisible by 4 is a leap year, so yy alone decides.
    days = calendar.monthrange(2000 + yy if yy % 4 == 0 else 2001, mm)[1]
    if dd > days:
        return f"AI ({code}): day {dd:02d} does not exist in month {mm:02d}"
    if code in _DATE_TIME_AIS and len(value) >= 10 and value[6:10].isdigit():
        hh, mi = int(value[6:8]), int(value[8:10])
        unknown_time = code in ("4324", "4325") and value[6:10] == "9999"
        if not unknown_time and (hh > 23 or mi > 59):
            return f"AI ({code}): time {value[6:8]}:{value[8:10]} does not exist"
    return None


def _element_errors(ai: GS1ApplicationIdentifier, value: str) -> list[str]:
    """Format, check digit and date errors of one element string."""
    code = ai.ai
    if not _pattern(ai).fullmatch(code + value):
        return [f"AI ({code}): {value!r} does not match format {ai.format}"]
    errors = []
    span = _CHECK_DIGIT_SPANS.get(code)
    if span is not None and not _gtin_check_ok(value[span]):
        errors.append(f"AI ({code}): wrong check digit in {value[span]}")
    if code in _DAY_ZERO_DATE_AIS or code in _OTHER_DATE_AIS:
        error = _date_error(code, value)
        if error:
            errors.append(error)
    return errors


def _add_element(ais: dict[str, str], errors: list[str], ai: GS1ApplicationIdentifier, value: str) -> None:
    code = ai.ai
    if code in ais and ais[code] != value:
        errors.append(f"AI ({code}) appears twice with different values")
        return
    ais[code] = value
    errors.extend(_element_errors(ai, value))


def _parse_element_string(text: str) -> tuple[dict[str, str], list[str]]:
    """Walk a GS1 element string (GS = FNC1), keeping raw values even when they are wrong."""
    ais: dict[str, str] = {}
    errors: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == GS:
            i += 1  # FNC1 in first position, or a separator (allowed after any AI)
            continue
        ai = _ai_at(text[i : i + 4])
        if ai is None:
            errors.append(f"no GS1 Application Identifier at offset {i}: {text[i : i + 4]!r}")
            break
        i += len(ai.ai)
        stop = text.find(GS, i)
        if stop < 0:
            stop = n
        fixed = _fixed_length(ai)
        end = stop if fixed is None else min(i + fixed, stop)
        value = text[i:end]
        i = end
        if not value:
            errors.append(f"AI ({ai.ai}) has no data")
            continue
        _add_element(ais, errors, ai, value)
    if not ais and not errors:
        errors.append("no GS1 element string")
    return ais, errors


# --- GS1 Digital Link ---------------------------------------------------------------------

# Primary keys that may start the identifier part of a Digital Link path.
_DL_PRIMARY_KEYS = frozenset(
    {"01", "00", "253", "255", "401", "402", "414", "415", "416", "417",
     "8003", "8004", "8006", "8010", "8013", "8017", "8018"}
)  # fmt: skip
# Short names from GS1 Digital Link 1.0/1.1, still printed on older packs.
_DL_SHORT_NAMES = {
    "gtin": "01", "sscc": "00", "gdti": "253", "gcn": "255", "ginc": "401", "gsin": "402",
    "gln": "414", "payTo": "415", "glnProd": "416", "partyGln": "417", "grai": "8003",
    "giai": "8004", "itip": "8006", "cpid": "8010", "gmn": "8013", "gsrnp": "8017",
    "gsrn": "8018", "cpv": "22", "lot": "10", "ser": "21", "tpx": "235", "glnx": "254",
    "refNo": "8020", "srin": "8019", "cpsn": "8011", "exp": "17",
}  # fmt: skip


def _dl_key(segment: str) -> str | None:
    code = _DL_SHORT_NAMES.get(segment, segment)
    ai = _ai_at(code) if code.isdigit() else None
    return code if ai is not None and ai.ai == code else None


def _parse_digital_link(url: str) -> tuple[dict[str, str], list[str]] | None:
    """AIs of a GS1 Digital Link URI, or None when the URL is not one."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    segments = parts.path.split("/")
    start = None
    for idx, seg in enumerate(segments):
        key = _dl_key(seg)
        if key in _DL_PRIMARY_KEYS and idx + 1 < len(segments) and segments[idx + 1]:
            start = idx
            break
    if start is None:
        return None
    ais: dict[str, str] = {}
    errors: list[str] = []
    pairs = segments[start:]
    if len(pairs) % 2:
        errors.append("Digital Link path has a key without a value")
        pairs = pairs[:-1]
    items = [(pairs[k], unquote(pairs[k + 1])) for k in range(0, len(pairs), 2)]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if _dl_key(key) is not None:
            items.append((key, value))  # other query parameters (linkType, tracking) are not AIs
    for key, value in items:
        code = _dl_key(key)
        if code is None:
            errors.append(f"Digital Link path segment {key!r} is not an AI")
            continue
        ai = _ai_at(code)
        assert ai is not None
        if code == "01" and value.isdigit() and len(value) in (8, 12, 13):
            value = value.zfill(14)  # the URI syntax allows GTIN-8/12/13 unpadded
        _add_element(ais, errors, ai, value)
    return ais, errors


# --- EAN / UPC ----------------------------------------------------------------------------


def _ean_gtin(aim: str | None, data: str) -> tuple[str | None, str | None, list[str]]:
    """(gtin, symbology name, errors) of an EAN/UPC read."""
    digits = data
    if aim == "]E3":
        # EAN-13/UPC-A with a 2- or 5-digit add-on (or EAN-8 with a 2-digit one): the add-on
        # is not part of the GTIN.
        base = {15: 13, 18: 13, 10: 8}.get(len(data))
        if base is None:
            return None, None, [f"EAN with add-on has an unexpected length {len(data)}"]
        digits = data[:base]
    if not digits.isdigit():
        return None, None, [f"EAN/UPC data {data!r} is not all digits"]
    name = None
    if len(digits) == 8 and aim == "]E0":
        # UPC-E sent compressed; its GTIN is that of the expanded UPC-A.
        try:
            digits = Upc.parse(digits).as_upc_a()
        except ParseError as exc:
            return None, "UPC-E", [str(exc)]
        name = "UPC-E"
    if len(digits) == 13:
        name = name or ("UPC-A" if digits[0] == "0" else "EAN-13")
    elif len(digits) == 12:
        name = name or "UPC-A"
    elif len(digits) == 8:
        name = name or "EAN-8"
    else:
        return None, None, [f"EAN/UPC data has {len(digits)} digits"]
    if not _gtin_check_ok(digits):
        return None, name, [f"wrong check digit in {digits}"]
    return digits.zfill(14), name, []


# --- decode ------------------------------------------------------------------------------


def _strip_terminator(raw: bytes) -> bytes:
    return raw.rstrip(b"\r\n")


def _looks_like_element_string(text: str) -> bool:
    if text.startswith(GS):
        return True
    if GS in text and _ai_at(text[:4]) is not None:
        return True
    return len(text) >= 16 and text.startswith("01") and text[2:16].isdigit()


def decode_scan(raw: bytes) -> ScanRead:
    """Decode one scanner read into the `decode scan` object of contract section 5."""
    raw = _strip_terminator(bytes(raw))
    errors: list[str] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        errors.append("data is not valid UTF-8; decoded as Latin-1")

    aim = None
    if _AIM_RE.match(text):
        aim, text = text[:3], text[3:]
    symbology = _symbology_name(aim) if aim else None
    gtin: str | None = None
    ais: dict[str, str] = {}
    gs1 = False

    if aim in _GS1_ELEMENT_STRING_AIMS:
        gs1 = True
        ais, found = _parse_element_string(text)
        errors.extend(found)
    elif aim in _EAN_AIMS:
        gs1 = True
        gtin, name, found = _ean_gtin(aim, text)
        symbology = name if aim == "]E0" and name else symbology
        errors.extend(found)
    elif aim == "]I1" and len(text) == 14 and text.isdigit():
        gs1 = True  # ITF-14 carries a GTIN-14
        if _gtin_check_ok(text):
            gtin = text
        else:
            errors.append(f"wrong check digit in {text}")
    else:
        link = _parse_digital_link(text) if text[:4].lower() == "http" else None
        if link is not None:
            gs1 = True
            ais, found = link
            errors.extend(found)
        elif aim is None and _looks_like_element_string(text):
            gs1 = True
            ais, found = _parse_element_string(text)
            errors.extend(found)
        elif aim is None and text.isascii() and text.isdigit() and len(text) in (8, 12, 13, 14):
            gs1 = True  # a bare EAN-8/UPC-A/EAN-13/GTIN-14: its check digit decides
            if _gtin_check_ok(text):
                gtin = text.zfill(14)
            else:
                errors.append(f"wrong check digit in {text}")

    if gs1 and gtin is None and "01" in ais and not any(e.startswith("AI (01)") for e in errors):
        gtin = ais["01"]
    valid = not gs1 or not errors
    return {
        "aim": aim,
        "symbology": symbology,
        "data": text,
        "gtin": gtin,
        "ai": ais,
        "valid": valid,
        "errors": errors,
    }


def decode_scan_hex(text: str) -> ScanRead:
    """Decode a read given as hex (spaces, colons and a 0x prefix allowed)."""
    try:
        data = parse_hex(text)
    except ValueError as exc:
        raise ScanParseError(str(exc)) from None
    return decode_scan(data)


# --- framing ------------------------------------------------------------------------------

_TERMINATORS = {
    "auto": re.compile(rb"\r\n?|\n"),
    "cr": re.compile(rb"\r"),
    "lf": re.compile(rb"\n"),
    "crlf": re.compile(rb"\r\n"),
}


class ScanFramer:
    """Splits the byte stream of a serial scanner into reads. Pure and incremental.

    `terminator` is "auto" (any of CR, LF, CRLF), "cr", "lf" or "crlf". Reads come back without
    their terminator; empty reads are dropped, which is also what keeps a CRLF split across two
    chunks (CR ends the read, the lone LF after it is an empty one) from giving an empty read. A read longer than
    `max_length` is discarded up to its terminator and noted in `take_errors()`, so a scanner
    that never sends a terminator cannot grow the buffer without bound.
    """

    def __init__(self, terminator: str = "auto", max_length: int = 4096) -> None:
        if terminator not in _TERMINATORS:
            raise ScanParseError(f"terminator must be one of {sorted(_TERMINATORS)}, got {terminator!r}")
        if max_length < 1:
            raise ScanParseError("max_length must be at least 1")
        self.terminator = terminator
        self.max_length = max_length
        self._re = _TERMINATORS[terminator]
        self._buf = bytearray()
        self._discarding = False
        self._errors: list[str] = []

    @property
    def buffered(self) -> bytes:
        """Bytes of the read in progress (not yet terminated)."""
        return bytes(self._buf)

    def take_errors(self) -> list[str]:
        """Errors since the last call (over-long reads discarded), oldest first."""
        errors, self._errors = self._errors, []
        return errors

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add received bytes; return the reads they complete, in order."""
        buf = self._buf
        buf += chunk
        reads: list[bytes] = []
        pos = 0
        for match in self._re.finditer(buf):
            self._emit(bytes(buf[pos : match.start()]), reads)
            pos = match.end()
        del buf[:pos]
        if len(buf) > self.max_length:
            # The crlf mode may hold a lone CR that could still become a terminator.
            keep = 1 if self.terminator == "crlf" and buf.endswith(b"\r") else 0
            if not self._discarding:
                self._errors.append(f"read longer than {self.max_length} bytes discarded")
            self._discarding = True
            del buf[: len(buf) - keep]
        return reads

    def _emit(self, read: bytes, reads: list[bytes]) -> None:
        if self._discarding:
            self._discarding = False  # the tail of an over-long read
            return
        if not read:
            return
        if len(read) > self.max_length:
            self._errors.append(f"read longer than {self.max_length} bytes discarded")
            return
        reads.append(read)
