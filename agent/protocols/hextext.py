"""Hex text as people paste it (spaces, colons, a 0x prefix), for the `decode` commands."""

from __future__ import annotations

import binascii
import re

_SEPARATORS = re.compile(r"[\s:]")


def parse_hex(text: str) -> bytes:
    """The bytes of `text`; ValueError("not hex: …") when it is not hex."""
    cleaned = _SEPARATORS.sub("", text)
    if cleaned[:2].lower() == "0x":
        cleaned = cleaned[2:]
    try:
        return binascii.unhexlify(cleaned)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not hex: {exc}") from None
