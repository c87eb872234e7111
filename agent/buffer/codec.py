"""How a chunk's body is stored: zstd-compressed JSON, told apart from older raw JSON by its first byte.

Decision (measured by `bench/compression.py`, numbers in the README): zstd level 1 over zlib.
On a chunk of 500 small events it stores about half of what zlib stores (6 against 12 bytes an
event) at a third of zlib's CPU to compress and to decompress; on a chunk of one event both
save about a quarter and zstd is still the faster. Higher zstd levels are slower and, on these
chunks, no smaller.

Layout of the `body` column:
- starts with `{` (0x7b): raw JSON, as every agent before compression wrote it, read as is;
- starts with the zstd frame magic (28 b5 2f fd): one zstd frame holding the JSON, its content
  size in the frame header (so one call decompresses it).
Anything else is not a chunk this agent wrote: `BodyCorrupt`.

Compressor and decompressor contexts are kept per thread (a zstd context is not thread-safe):
the writer thread compresses, the uplink and status readers decompress.
"""

from __future__ import annotations

import threading

import zstandard

LEVEL = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_local = threading.local()


class BodyCorrupt(ValueError):
    """A stored chunk body is neither raw JSON nor a zstd frame that decompresses."""


def pack(body: bytes) -> bytes:
    """The stored form of a chunk body (the JSON envelopes joined by commas)."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    packed: bytes = compressor.compress(body)
    return packed


def unpack(stored: bytes) -> bytes:
    """The JSON body of a stored chunk, whichever way it was stored."""
    if stored[:1] == b"{":
        return bytes(stored)
    if stored[:4] != ZSTD_MAGIC:
        raise BodyCorrupt(f"stored chunk body starts with {bytes(stored[:4]).hex()}: neither JSON nor zstd")
    try:
        body: bytes = _decompressor().decompress(stored)
    except zstandard.ZstdError as exc:
        raise BodyCorrupt(f"stored chunk body does not decompress: {exc}") from None
    return body


def unpack_head(stored: bytes, size: int = 64) -> bytes:
    """The first `size` bytes of a stored chunk's JSON, without decompressing all of it."""
    if stored[:1] == b"{":
        return bytes(stored[:size])
    if stored[:4] != ZSTD_MAGIC:
        raise BodyCorrupt(f"stored chunk body starts with {bytes(stored[:4]).hex()}: neither JSON nor zstd")
    try:
        with _decompressor().stream_reader(stored) as reader:
            head: bytes = reader.read(size)
    except zstandard.ZstdError as exc:
        raise BodyCorrupt(f"stored chunk body does not decompress: {exc}") from None
    return head


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor
