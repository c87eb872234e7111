"""What drivers and the local API hand events to: the interface of the buffer, as they see it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.core.envelope import Event


class BufferUnavailable(Exception):
    """The buffer cannot take events right now; `code` says why (in health, logs, metrics, 503 bodies).

    Callers answer "not now" (no ACK, 503 with Retry-After) and try again: nothing is taken.
    """

    code = "buffer_unavailable"


class BufferFull(BufferUnavailable):
    """The buffer's disk cap (`[buffer] max_bytes`) is reached and nothing lower in priority is left to drop."""

    code = "buffer_full"


class DiskFull(BufferUnavailable):
    """The file system holding `data_dir` has no room left (ENOSPC, SQLITE_FULL), below the cap."""

    code = "disk_full"


class BufferIOError(BufferUnavailable):
    """The buffer file or its side files could not be written or read (disk I/O error, read-only FS, …)."""

    code = "buffer_io_error"


@dataclass(frozen=True, slots=True)
class Dedup:
    """A key that makes a commit happen at most once (a POS `txn_id`, an `Idempotency-Key`).

    `namespace` separates kinds of keys (`pos:R1`, `api`); `result` is stored with the key and
    given back to every later commit with the same key, which then commits nothing. It may be a
    function of the commit's outcome (called in the writer, before the transaction ends), for a
    result that holds the ids the commit assigns, such as the local API's 200 answer.
    """

    namespace: str
    key: str
    result: bytes | Callable[[Committed], bytes] = b""


@dataclass(frozen=True, slots=True)
class Committed:
    """The outcome of a durable commit, or, for a repeated dedup key, the first commit's result.

    `stems` are (id stem, count) pairs: the i-th event of a stem has id `stem + f"{i:04x}"`
    (see `agent.core.envelope.Uuid7`); `first_seq` is the first event's seq, the rest follow.
    """

    stems: tuple[tuple[str, int], ...] = ()
    first_seq: int = 0
    duplicate: bool = False
    result: bytes = b""

    @property
    def count(self) -> int:
        """How many events this commit stored."""
        return sum(n for _stem, n in self.stems)

    @property
    def ids(self) -> list[str]:
        """The events' ids, in the order they were handed in."""
        return [f"{stem}{i:04x}" for stem, n in self.stems for i in range(n)]

    @property
    def seqs(self) -> range:
        """The events' seqs, in the order they were handed in."""
        return range(self.first_seq, self.first_seq + self.count)


class EventSink(Protocol):
    """Where events go. Implemented by `agent.buffer.Outbox`."""

    async def commit(self, events: Sequence[Event], dedup: Dedup | None = None) -> Committed:
        """Commit durably (fsync'd) before returning; all or nothing. Raises BufferUnavailable."""
        ...

    def offer(self, event: Event) -> None:
        """Hand over a best-effort event (telemetry, traffic) without waiting; never raises.

        It is committed with the next group; if the cap refuses it, it is counted as dropped.
        """
        ...


class DeviceHealth(Protocol):
    """Where drivers report whether their device is up (shown by `status`, `doctor`, /metrics)."""

    def report(self, kind: str, name: str, up: bool, error: str | None = None) -> None: ...

    def seen(self, kind: str, name: str) -> None:
        """The device produced an event just now (its `last_event` in `status`)."""
        ...
