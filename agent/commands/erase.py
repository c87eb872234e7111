"""`erase_subject` in the buffer's writer: every buffered event carrying a member id or token goes.

An event carries the subject when any string in it (its `data` at any depth, its `source`) equals
the member id or the token exactly. Exact equality, not a substring: a short id must not erase
unrelated events; a receipt whose regexes pulled out the member id carries it as `member_id`.

A chunk holds several envelopes (JSON joined by commas, compressed: agent/buffer/codec.py). A
chunk whose envelopes all go is deleted; one that keeps some is rewritten with the kept envelopes
byte for byte as they were (their seq and id unchanged; the row keeps its key, so the uplink's
bookkeeping by seq holds). Chunks that cannot contain the subject (neither the value's UTF-8 nor
its JSON-escaped form is in the body) are not parsed.

The deletes and rewrites run under `footprint.overwriting_deletes` (secure_delete=ON: the freed
cells and pages are zeroed), and the caller truncates the WAL after the commit, so what was
erased is overwritten on disk, not only unlinked.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from agent.buffer.codec import pack, unpack
from agent.buffer.footprint import overwriting_deletes
from agent.buffer.schema import ROW_OVERHEAD
from agent.buffer.writer import CallResult
from agent.core.envelope import PRIORITY_LOW

_decoder = json.JSONDecoder()


def _carries(value: Any, needles: frozenset[str]) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item in needles:
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _envelopes(body: str) -> list[tuple[str, dict[str, Any]]]:
    """Each envelope of a chunk body with its exact text."""
    out = []
    pos = 0
    end = len(body)
    while pos < end:
        obj, stop = _decoder.raw_decode(body, pos)
        out.append((body[pos:stop], obj))
        pos = stop + 1  # the comma between envelopes
    return out


def _needles(member_id: str | None, token: str | None) -> tuple[frozenset[str], list[bytes]]:
    needles = frozenset(v for v in (member_id, token) if v)
    probes = [
        p
        for v in needles
        for p in {v.encode(), json.dumps(v)[1:-1].encode(), json.dumps(v, ensure_ascii=False)[1:-1].encode()}
    ]
    return needles, probes


def candidates(conn: sqlite3.Connection, member_id: str | None, token: str | None) -> tuple[list[int], int]:
    """(seqs of chunks that may carry the subject, the highest seq looked at), from a read connection.

    The whole buffer is decompressed here, outside the writer, so commits (POS ACKs) do not wait
    behind it; `erase` then looks again only at these rows and at those committed since.
    """
    _needles_set, probes = _needles(member_id, token)
    found: list[int] = []
    last = 0
    cursor = conn.execute("SELECT seq, body FROM chunks ORDER BY seq")
    try:
        for seq, stored in cursor:
            last = seq
            body = unpack(stored)
            if any(p in body for p in probes):
                found.append(seq)
    finally:
        cursor.close()
    return found, last


def erase(
    conn: sqlite3.Connection,
    member_id: str | None,
    token: str | None,
    seqs: list[int] | None = None,
    after: int = 0,
) -> CallResult:
    """Remove every buffered event carrying `member_id` or `token`; `value` is how many went.

    With `seqs` (from `candidates`), only those rows and the rows above `after` are read; without,
    the whole buffer.
    """
    needles, probes = _needles(member_id, token)
    erased = removed_events = removed_bytes = removed_low = 0
    with overwriting_deletes(conn):
        if seqs is None:
            rows = conn.execute("SELECT seq, n, prio, body FROM chunks ORDER BY seq").fetchall()
        else:
            rows = [
                r
                for seq in seqs
                for r in conn.execute("SELECT seq, n, prio, body FROM chunks WHERE seq=?", (seq,))
            ]
            rows += conn.execute(
                "SELECT seq, n, prio, body FROM chunks WHERE seq > ? ORDER BY seq", (after,)
            ).fetchall()
        for seq, n, prio, stored in rows:
            body = unpack(stored)
            if not any(p in body for p in probes):
                continue
            parts = _envelopes(body.decode("utf-8"))
            kept = [
                text
                for text, env in parts
                if not (_carries(env.get("data"), needles) or env.get("source") in needles)
            ]
            gone = len(parts) - len(kept)
            if not gone:
                continue
            erased += gone
            old_size = len(stored) + ROW_OVERHEAD
            if kept:
                packed = pack(",".join(kept).encode("utf-8"))
                conn.execute("UPDATE chunks SET n=?, body=? WHERE seq=?", (len(kept), packed, seq))
                delta = old_size - (len(packed) + ROW_OVERHEAD)
                removed_events += n - len(kept)
            else:
                conn.execute("DELETE FROM chunks WHERE seq=?", (seq,))
                delta = old_size
                removed_events += n
            removed_bytes += delta
            if prio == PRIORITY_LOW:
                removed_low += delta
    return CallResult(
        value=erased,
        removed_events=removed_events,
        removed_bytes=removed_bytes,
        removed_low_bytes=removed_low,
    )
