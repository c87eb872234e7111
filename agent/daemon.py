"""`store-agent run`: one asyncio loop wiring the buffer, the uplink, the drivers and the web server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent import __version__
from agent.buffer import Outbox
from agent.commands.channel import CommandChannel, DoctorCheck
from agent.config import AgentConfig, ConfigError
from agent.health import HealthBoard
from agent.runlock import RunLock
from agent.sdnotify import Notifier, watchdog_interval
from agent.status import StatusReporter
from agent.uplink import Uplink

log = logging.getLogger(__name__)

SHUTDOWN_SEND_S = 3.0
GC_THRESHOLD = 10_000
MAINTENANCE_EVERY_S = 3600.0


class Agent:
    """The running agent: its parts, and their start and stop in order."""

    def __init__(
        self,
        cfg: AgentConfig,
        notifier: Notifier | None = None,
        doctor: Callable[[], list[DoctorCheck]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.doctor = doctor  # `doctor`'s checks, for the `diagnostics` command (agent/cli owns them)
        self.notifier = notifier or Notifier()
        self.health = HealthBoard()
        self.outbox = Outbox.from_config(cfg)
        self.uplink: Uplink | None = None
        self.reporter: StatusReporter | None = None
        self.commands: CommandChannel | None = None
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: Any = None
        self.exit_code = 0

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (or a fatal error); returns the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.cfg.agent.data_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.cfg.agent.data_dir)
        if not lock.acquire():
            log.error("another agent is running on %s (%s is locked)", self.cfg.agent.data_dir, lock.path)
            return 1
        await asyncio.to_thread(self.outbox.open)
        self.outbox.start()
        self.reporter = reporter = StatusReporter(self.outbox, None, self.health)
        self.uplink = reporter.uplink = Uplink(self.cfg, self.outbox, metrics=reporter.metrics)
        self.commands = self._command_channel(reporter)
        self.uplink.start()
        self._check_mqtt_security()
        try:
            await self._start_web()
            self._start_drivers()
        except ConfigError as exc:
            log.error("%s", exc)
            self.exit_code = 2
            self.stopping.set()
        self.notifier.notify(f"READY=1\nSTATUS=buffer open, {self.outbox.count} events waiting")
        log.info(
            "store-agent %s running: tenant=%s store=%s agent=%s buffer=%s",
            __version__,
            self.cfg.agent.tenant,
            self.cfg.agent.store,
            self.cfg.agent.id,
            self.outbox.path,
        )
        # what start-up made lives as long as the process: keep the collector from walking it again,
        # and let young garbage (per-request dicts and lists) pile up longer before a collection
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 20, 50)
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        self.spawn("maintenance", self._maintenance)
        await self.stopping.wait()
        watchdog.cancel()
        await self._shutdown()
        lock.release()
        return self.exit_code

    def _command_channel(self, reporter: StatusReporter) -> CommandChannel:
        """The command channel, wired to the uplink before it connects (it subscribes on connect)."""
        assert self.uplink is not None
        channel = CommandChannel(self.cfg, self.outbox, self.uplink, reporter, self.doctor).start()
        reporter.threads["commands"] = lambda: channel.alive  # in /healthz, /metrics and the watchdog
        return channel

    def _check_mqtt_security(self) -> None:
        m = self.cfg.mqtt
        if m.host is not None and not m.tls and not m.is_loopback:
            log.warning(
                "!!! mqtt.tls = false for the non-loopback broker %s: events and commands travel "
                "in plaintext; set tls = true !!!",
                m.host,
            )

    def spawn(self, name: str, factory: Callable[[], Awaitable[Any]]) -> None:
        """Run a long-lived part as a task; if it dies, log it (its health shows it) and go on."""

        async def guarded() -> None:
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("%s stopped: %s", name, exc, exc_info=exc)
                self.health.last_error = f"{name}: {exc}"

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    def _start_drivers(self) -> None:
        from drivers.registry import build_drivers

        for name, runner in build_drivers(self.cfg, self.outbox, self.health):
            self.spawn(name, runner)

    async def _start_web(self) -> None:
        api = self.cfg.local_api
        if not api.enabled:
            return
        import uvicorn

        from agent.httpserver import server_config
        from agent.web import make_app

        assert self.reporter is not None and self.uplink is not None
        app = make_app(self.cfg, self.outbox, self.reporter, self.uplink)
        server = uvicorn.Server(server_config(app, api.host, api.port))  # with the limits uvicorn lacks
        self._server = server

        async def serve() -> None:
            try:
                await server.serve()
            except SystemExit:  # uvicorn exits this way when it cannot bind
                log.error("local web server could not listen on %s", api.listen)
                self.health.report("web", "local_api", False, f"cannot listen on {api.listen}")

        self._tasks.append(asyncio.create_task(serve(), name="web"))
        for _ in range(200):  # bounded wait until it listens (or failed)
            if server.started or self._tasks[-1].done():
                break
            await asyncio.sleep(0.01)
        if server.started:
            self.health.report("web", "local_api", True)

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        period = interval if interval else 5.0
        while True:
            await asyncio.sleep(period)
            # every long-lived thread runs (a full buffer is no reason for systemd to restart us)
            threads = {"buffer writer": self.outbox.alive, "uplink": self.uplink is None or self.uplink.alive}
            if self.reporter is not None:
                threads.update({name: alive() for name, alive in self.reporter.threads.items()})
            healthy = all(threads.values())
            if healthy and interval:
                self.notifier.notify("WATCHDOG=1")
            elif not healthy:
                down = ", ".join(name for name, up in threads.items() if not up)
                log.error("unhealthy: %s not running; withholding WATCHDOG=1", down)

    async def _maintenance(self) -> None:
        from agent.buffer.maintenance import hourly

        while True:
            result = await asyncio.to_thread(self.outbox.call, lambda conn: hourly(conn, time.time()))
            log.debug("maintenance: %s", result)
            await asyncio.sleep(MAINTENANCE_EVERY_S)

    async def _shutdown(self) -> None:
        log.info("stopping")
        self.notifier.notify("STOPPING=1")
        if self._server is not None:
            self._server.should_exit = True
        for task in self._tasks:
            if task.get_name() != "web":
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        if self.uplink is not None:
            with contextlib.suppress(Exception):  # a stuck or failing writer must not hold up the stop
                await asyncio.to_thread(self.outbox.flush, SHUTDOWN_SEND_S)
            await asyncio.to_thread(self.uplink.stop, SHUTDOWN_SEND_S)
        if self.commands is not None:
            await asyncio.to_thread(self.commands.stop)
        await asyncio.to_thread(self.outbox.close)
        log.info("stopped")


def tune_malloc() -> None:
    """Keep glibc's heap from holding on to the big buffers a drain passes through.

    Batches and chunks are 100-300 KB bytes objects. glibc raises its mmap threshold each time such
    a block is freed, after which they come from the heap, interleave with long-lived objects and
    are never given back: RSS doubled during a 1M-event drain. A fixed threshold keeps them in
    their own mappings, returned on free; two arenas are plenty for the agent's few threads.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed: disables the dynamic threshold)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def run(cfg: AgentConfig, doctor: Callable[[], list[DoctorCheck]] | None = None) -> int:
    """Run the daemon in the foreground; returns the exit status."""
    tune_malloc()
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        runner = asyncio.run
    return runner(Agent(cfg, doctor=doctor).run())
