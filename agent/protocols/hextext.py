"""Hex text as people paste it (spaces, colons, a 0x prefix), for the `decode` commands.

Errors say where: the offset of the first character that is not a hex digit, counted in the
text as given (separators and the 0x prefix included), so it can be found in what was pasted.
"""

from __future__ import annotations

import re

from agent.core.errors import at_byte

_SEPARATORS = frozenset(" \t\r\n\v\f:")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_PREFIX = re.compile(r"[\s:]*0[xX]")


def parse_hex(text: str) -> bytes:
    """The bytes of `text`; ValueError("not hex: … at byte N") when it is not hex."""
    prefix = _PREFIX.match(text)
    start = prefix.end() if prefix else 0
    digits: list[str] = []
    for offset in range(start, len(text)):
        char = text[offset]
        if char in _HEX_DIGITS:
            digits.append(char)
        elif char not in _SEPARATORS:
            where = at_byte(len(text[:offset].encode("utf-8")))
            raise ValueError(f"not hex: {char!r} {where}")
    if len(digits) % 2:
        raise ValueError(f"not hex: an odd number of hex digits ({len(digits)}); the last byte is cut off")
    return bytes.fromhex("".join(digits))
