"""The one RFC 3339 parser of the agent: timestamps from the local API, POS payloads and drivers.

Accepted: RFC 3339 `date-time` (section 5.6) with an explicit offset (`Z` or `±hh:mm`), `t`/`z`
in lower case and the space for `T` that its note allows, any number of fraction digits. Not
accepted: a missing offset, a missing seconds field, `+hhmm`, week or ordinal dates, and the
other ISO 8601 forms `datetime.fromisoformat` reads (which ones depends on the Python version:
3.11 takes only 0, 3 or 6 fraction digits, 3.12 more). Output is the envelope's `ts`: UTC with
exactly three fraction digits, digits beyond milliseconds cut (never rounded, so a time never
moves into the next second).

Pure: no I/O. The hot path (the local API converts one `ts` per event) is a regex match, a dict
lookup of the minute and string slicing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

# RFC 3339 `date-time`. Field ranges are checked here; whether the day exists in its month is
# checked on conversion. Leap seconds (:60) are refused: UTC conversion has nowhere to put them.
RFC3339_PATTERN = (
    r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt ](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
_rfc3339 = re.compile(RFC3339_PATTERN)
# "YYYY-MM-DDTHH:MM" + offset -> that minute in UTC. Offsets are whole minutes, so seconds never
# change the conversion: events of the same minute share an entry and convert by slicing.
_minutes: dict[str, str] = {}
_MINUTES_MAX = 8192


class TimestampError(ValueError):
    """Text that is not RFC 3339 with an offset, or a date and time that does not exist."""


def _utc_minute(head: str, offset: str) -> str:
    if offset == "Z":
        tz = UTC
    else:
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
        tz = timezone(-delta if offset[0] == "-" else delta)
    try:
        local = datetime(
            int(head[0:4]), int(head[5:7]), int(head[8:10]), int(head[11:13]), int(head[14:16]), tzinfo=tz
        )
        utc = local.astimezone(UTC)
    except (ValueError, OverflowError):
        raise TimestampError("not a valid date and time") from None
    return f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}"


def utc_ms_checked(ts: str) -> str:
    """An RFC 3339 `ts` already matched by RFC3339_PATTERN, as UTC with milliseconds.

    Fractions beyond milliseconds are truncated. Raises TimestampError for a day that does not
    exist (2026-02-30) or a result outside years 1-9999.
    """
    if ts[-1] in "Zz":
        key = ts[:16] + "Z"
        frac = ts[20:-1]
    else:
        key = ts[:16] + ts[-6:]
        frac = ts[20:-6]
    prefix = _minutes.get(key)
    if prefix is None:
        prefix = _utc_minute(key[:16], key[16:])
        if len(_minutes) >= _MINUTES_MAX:
            _minutes.clear()
        _minutes[key] = prefix
    if len(frac) == 3:
        if key[16:] == "Z" and ts[-1] == "Z" and key[:16] == prefix:
            return ts  # already the envelope's form
        return f"{prefix}:{ts[17:19]}.{frac}Z"
    return f"{prefix}:{ts[17:19]}.{(frac + '00')[:3] if frac else '000'}Z"


def is_rfc3339(text: object) -> bool:
    """True for text of RFC 3339 form with an offset (the day may still not exist: see `utc_ms`)."""
    return isinstance(text, str) and _rfc3339.fullmatch(text) is not None  # match() lets "$" pass a final \n


def utc_ms(text: str) -> str:
    """RFC 3339 with an offset -> the envelope's `ts`, UTC with milliseconds; TimestampError otherwise."""
    if not is_rfc3339(text):
        raise TimestampError("not RFC 3339 with an offset")
    return utc_ms_checked(text)


def parse(text: str) -> datetime:
    """RFC 3339 with an offset -> an aware datetime (microseconds kept, finer digits cut)."""
    if not is_rfc3339(text):
        raise TimestampError("not RFC 3339 with an offset")
    main = text[:19]
    zulu = text[-1] in "Zz"
    frac = text[20 : len(text) - (1 if zulu else 6)] if text[19] == "." else ""
    if zulu:
        tz = UTC
    else:
        delta = timedelta(hours=int(text[-5:-3]), minutes=int(text[-2:]))
        tz = timezone(-delta if text[-6] == "-" else delta)
    try:
        return datetime(
            int(main[0:4]),
            int(main[5:7]),
            int(main[8:10]),
            int(main[11:13]),
            int(main[14:16]),
            int(main[17:19]),
            int((frac + "000000")[:6]) if frac else 0,
            tzinfo=tz,
        )
    except ValueError:
        raise TimestampError("not a valid date and time") from None
