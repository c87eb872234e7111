"""Runs of missing `seq` per agent, and which of them a `system.dropped` event explains (pure).

`store_seq_gaps` (ingest/db.py) computes the same in SQL; this is its specification, and the
tests check the view against it.

A gap is a run of `seq` missing between two received events of one agent (tenant, store, id).
The agent's buffer drops only when full, only low-priority events, always the oldest first
(agent/buffer/writer.py `_make_room`), and then commits a `system.dropped` event whose
`data.count` says how many it dropped. So dropped events are lost in `seq` order, and each
report comes after (has a higher `seq` than) what it reports. A gap is `explained` when the
missing events up to and including it, counted in `seq` order, are no more than the total the
agent reported dropped, and a report exists at or after the gap's end (`last_report >=
before_seq`). Anything else, an unexplained gap, means events went missing that the agent did
not drop: lost in transit, or still on their way (a gap can close when a late copy arrives).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Gap:
    after_seq: int
    before_seq: int
    missing: int
    explained: bool


def seq_gaps(seqs: Iterable[int], drop_reports: Iterable[tuple[int, float]]) -> list[Gap]:
    """One agent's gaps: `seqs` received (any order, repeats allowed), reports as (seq, count)."""
    ordered = sorted(set(seqs))
    reports = list(drop_reports)
    dropped = sum(count for _, count in reports)
    last_report = max((seq for seq, _ in reports), default=None)
    gaps: list[Gap] = []
    so_far = 0
    for prev, seq in zip(ordered, ordered[1:], strict=False):
        if seq - prev > 1:
            missing = seq - prev - 1
            so_far += missing
            explained = last_report is not None and so_far <= dropped and last_report >= seq
            gaps.append(Gap(prev, seq, missing, explained))
    return gaps
