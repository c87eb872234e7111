"""The local web server's transport: uvicorn with httptools, plus the limits uvicorn does not have.

A field test took the agent to 562 MB with one connection sending endless headers, locked every
client out with 8,300 idle half-requests, and held 1 GB in open chunked bodies. What uvicorn
offers does not cover it: `limit_concurrency` answers 503 to *new requests* once connections
reach the limit, so the half-requests themselves lock the real clients out; its keep-alive
timeout only runs between requests; httptools (llhttp) has no header size limit and uvicorn no
header or body timeout. So the HTTP protocol is uvicorn's own with a guard around it:

- Header bytes: the request line and headers of one request may take at most `max_header_bytes`
  (bytes fed to the parser before the headers are complete); more gets 431 and the connection
  closed. Memory per connection is then bounded by that plus one socket read.
- Header time: from the connection's first byte (or from accept, for a connection that sends
  nothing) to the end of the headers, at most `header_timeout_s`; then 408 and close.
- Body time: from the end of the headers to the end of the body, at most `body_timeout_s` (a
  total, not an idle time: a body dripping a byte a second is cut all the same); then the
  connection is dropped. No timer runs while the app works on a request: that time is ours.
- Connections: at most `max_connections`. A new connection over it evicts the connection that
  has waited longest on its client (headers or body not sent, idle keep-alive, or not reading
  its answers); if every connection is busy in the app, the new one gets 503 and is closed. An
  attacker's half-requests therefore never lock a real client out: they are what is evicted.

Memory held by bodies in the app (the event API's read buffer) is bounded separately, by a
budget shared by all requests (see `agent.web.BodyBudget`).
"""

from __future__ import annotations

import asyncio
import resource
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class Limits:
    """The web server's limits; the defaults are the agent's."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 30.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 256


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header size, header and body time, and connection limits."""

    limits = Limits()
    max_connections = Limits.max_connections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._since = self.loop.time()  # since when this connection waits on its client
        self._header_bytes = 0
        self._in_headers = True  # the bytes that arrive now belong to a request's head
        self._begun = False  # a request's first byte has arrived, its last not yet

    # ---- timers ---------------------------------------------------------------------------------

    def _arm(self, seconds: float, phase: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._since = self.loop.time()
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if phase == "header" and self._idle():
            self._refuse(
                408,
                "request_timeout",
                f"the request's headers took longer than {self.limits.header_timeout_s:g} s",
            )
        else:  # mid-body: the app may be reading it, so no answer of ours, just the end of it
            self.transport.abort()

    def _refuse(self, status: int, error: str, reason: str) -> None:
        body = orjson.dumps({"error": error, "reason": reason})
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            % (status, _REASONS[status], len(body))
        )
        if status == 503:
            head += b"retry-after: 1\r\n"
        self._disarm()
        self.transport.write(head + b"\r\n" + body)
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that does not read cannot hold the connection open
        else:
            self.transport.close()

    # ---- connections ------------------------------------------------------------------------------

    def _evictable(self) -> bool:
        """Waiting on its client: headers or body not sent, idle between requests, or answers not read."""
        return self._deadline is not None or self._idle() or bool(self.flow and self.flow.write_paused)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, "header")
        if len(self.connections) > self.max_connections:
            waiting = [
                c
                for c in self.connections
                if c is not self
                and isinstance(c, GuardedHttpProtocol)
                and not c.transport.is_closing()
                and c._evictable()
            ]
            if waiting:
                victim = min(waiting, key=lambda c: c._since)
                victim._disarm()
                victim.transport.abort()
            else:
                self._refuse(
                    503, "too_many_connections", f"{self.max_connections} connections are busy; retry shortly"
                )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        super().handle_websocket_upgrade()

    # ---- bytes and parser callbacks -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self.parser is None or self.transport.is_closing():
            return
        if self._in_headers:
            if self._header_bytes > self.limits.max_header_bytes:
                if self._idle():
                    self._refuse(
                        431,
                        "headers_too_large",
                        f"the request line and headers may take at most {self.limits.max_header_bytes} bytes",
                    )
                else:  # pipelined behind a request still being answered: no answer of ours in between
                    self._disarm()
                    self.transport.abort()
                return
            if self._deadline is None and self._idle():
                # uvicorn stopped its keep-alive timer on these bytes: the header time runs instead
                self._arm(self.limits.header_timeout_s, "header")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._begun = True
        if self._deadline is None and self._idle():
            self._arm(self.limits.header_timeout_s, "header")

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._disarm()
        super().on_headers_complete()
        if not self.pipeline:  # a pipelined request's body is not read until its turn
            self._arm(self.limits.body_timeout_s, "body")

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_headers = True
        self._begun = False
        self._header_bytes = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._deadline is not None:
            return
        self._since = self.loop.time()
        if not self._in_headers:  # answered before its body ended (a 401, a 413): the rest must come in time
            self._arm(self.limits.body_timeout_s, "body")
        elif self._begun:  # the next request began while this one was answered: its head is due
            self._unset_keepalive_if_required()
            self._arm(self.limits.header_timeout_s, "header")


def protocol_class(limits: Limits) -> type[GuardedHttpProtocol]:
    """The protocol class uvicorn builds connections from, with these limits.

    The connection cap is also kept under half the process's open-file limit, so the agent's own
    files (buffer, serial ports) always find a descriptor.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = (
        limits.max_connections
        if soft == resource.RLIM_INFINITY
        else min(limits.max_connections, max(16, soft // 2))
    )
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "max_connections": cap})


class _App:
    """The app as uvicorn sees it: an ASGI 3 callable of exactly three arguments.

    uvicorn calls its app with no arguments to sniff for a factory; an app whose `__call__` takes
    `*args` (wrapped, instrumented, or mutated by the mutation tester) would be taken for one.
    """

    __slots__ = ("app",)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def server_config(
    app: Any, host: str, port: int, limits: Limits | None = None, **kwargs: Any
) -> uvicorn.Config:
    """uvicorn's config for the local web server: httptools behind the guard, no access log."""
    limits = limits or Limits()
    return uvicorn.Config(
        _App(app),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        http=protocol_class(limits),
        timeout_keep_alive=int(limits.keep_alive_s) or 1,
        server_header=False,
        interface="asgi3",
        **kwargs,  # said, not guessed from the app's type
    )
