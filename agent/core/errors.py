"""Where an error is, said one way everywhere: config keys, environment variables, byte offsets.

Config errors name the key as a path (`pos[0].baudrate`), led by the environment variable that
set it when one did (`STORE_AGENT__POS__0__PORT (pos[0].port): ...`); decode and parser errors
name the byte (`at byte 7`). Every message that says where goes through these functions, so a
technician reads one style.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["at_byte", "key_path", "located"]


def key_path(loc: Sequence[str | int]) -> str:
    """A key's path as written in docs: `mqtt.port`, `pos[0].baudrate`; "(top level)" for none."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return text or "(top level)"


def at_byte(offset: int) -> str:
    """A position in bytes given to a parser, counted from 0."""
    return f"at byte {offset}"


def located(where: str, message: str) -> str:
    """`where: message`, the one shape of a located error."""
    return f"{where}: {message}"
