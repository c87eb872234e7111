"""The agent's state in one place: `status --json`, /v1/status, /healthz, /metrics and the metrics topic."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.buffer import Outbox
from agent.buffer.writer import CAP_REACHED
from agent.health import HealthBoard
from agent.uplink import Uplink


class StatusReporter:
    """Builds the status object and the metric families from the live parts."""

    def __init__(
        self,
        outbox: Outbox,
        uplink: Uplink | None,
        health: HealthBoard,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.uplink = uplink
        self.health = health
        self.started = clock()
        self._clock = clock
        self.commands: dict[tuple[str, str], int] = {}
        # other long-lived threads (name -> is it running?), shown like the writer's and the uplink's
        self.threads: dict[str, Callable[[], bool]] = {}

    def status(self) -> dict[str, Any]:
        """The `status --json` object."""
        stats = self.outbox.stats()
        up = self.uplink.status if self.uplink is not None else None
        last_error = (up.last_error if up else None) or self.health.last_error or self.outbox.last_error
        return {
            "version": __version__,
            "uptime_s": round(self._clock() - self.started, 3),
            "connection": {
                "configured": bool(up and up.configured),
                "connected": bool(up and up.connected),
                "since": up.since if up else None,
                "reconnects": up.reconnects if up else 0,
                "next_attempt_s": up.next_attempt_s if up else None,
                "inflight_batches": up.inflight if up else 0,
                "last_error": up.last_error if up else None,
                "max_packet_bytes": up.max_packet_bytes if up else None,
                "set_aside": {
                    "batches_total": up.set_aside_total if up else 0,
                    "chunks": up.set_aside_chunks if up else 0,
                    "events": up.set_aside_events if up else 0,
                    "last_reason": up.last_set_aside if up else None,
                },
            },
            "buffer": {
                "path": str(self.outbox.path),
                "events": stats.events,
                "bytes": stats.bytes,
                "max_bytes": self.outbox.max_bytes,
                "oldest_unsent_s": round(stats.oldest_unsent_s, 3),
                "next_seq": stats.next_seq,
                "quarantined": self.outbox.quarantined,
            },
            "events": {"in": stats.events_in, "sent": stats.events_sent, "dropped": stats.events_dropped},
            "devices": self.health.snapshot(),
            "last_error": last_error,
        }

    def problems(self) -> list[dict[str, str]]:
        """Why the agent cannot do its job right now (empty while it can): /healthz's 503 and its body.

        A broker outage is not one: the buffer is there for it (contract section 9).
        """
        out = []
        if not self.outbox.alive:
            out.append({"code": "buffer_writer_down", "message": "the buffer's writer thread is not running"})
        failure = self.outbox.failure
        if failure == CAP_REACHED:  # nothing is broken, but transactions are not acknowledged
            out.append({"code": "buffer_full", "message": f"buffer commits are refused: {failure}"})
        elif failure:
            out.append({"code": "buffer_failing", "message": f"buffer commits fail: {failure}"})
        if self.uplink is not None and not self.uplink.alive:
            out.append(
                {"code": "uplink_down", "message": "the uplink thread is not running: nothing is sent"}
            )
        for name, alive in self.threads.items():
            if not alive():
                out.append({"code": f"{name}_down", "message": f"the {name} thread is not running"})
        return out

    def healthy(self) -> bool:
        """The loop answers (we are running this), the buffer takes commits and both threads run."""
        return not self.problems()

    def metrics(self) -> dict[str, Any]:
        """The figures of /metrics as JSON (the `metrics` topic)."""
        stats = self.outbox.stats()
        up = self.uplink.status if self.uplink is not None else None
        return {
            "ts": round(self._clock(), 3),
            "events_in_total": stats.events_in,
            "events_sent_total": stats.events_sent,
            "events_dropped_total": stats.events_dropped,
            "buffer_events": stats.events,
            "buffer_bytes": stats.bytes,
            "buffer_oldest_unsent_seconds": round(stats.oldest_unsent_s, 3),
            "mqtt_connected": int(bool(up and up.connected)),
            "buffer_writable": int(self.outbox.alive and not self.outbox.failure),
            "thread_up": [
                {"thread": "buffer_writer", "value": int(self.outbox.alive)},
                {"thread": "uplink", "value": int(self.uplink is not None and self.uplink.alive)},
                *({"thread": name, "value": int(alive())} for name, alive in self.threads.items()),
            ],
            "mqtt_reconnects_total": up.reconnects if up else 0,
            "mqtt_set_aside_batches_total": up.set_aside_total if up else 0,
            "buffer_set_aside_events": up.set_aside_events if up else 0,
            "commands_total": [
                {"name": name, "outcome": outcome, "value": value}
                for (name, outcome), value in sorted(self.commands.items())
            ],
            "device_up": [
                {"kind": d["kind"], "name": d["name"], "value": int(bool(d["up"]))}
                for d in self.health.snapshot()
            ],
        }

    def prometheus(self) -> str:
        """/metrics in the Prometheus text format 0.0.4."""
        m = self.metrics()
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

        family(
            "store_agent_events_in_total",
            "counter",
            "Events committed to the buffer.",
            [({"stream": s}, v) for s, v in sorted(m["events_in_total"].items())],
        )
        family(
            "store_agent_events_sent_total",
            "counter",
            "Events acknowledged by the broker.",
            [({"stream": s}, v) for s, v in sorted(m["events_sent_total"].items())],
        )
        family(
            "store_agent_events_dropped_total",
            "counter",
            "Events dropped by the buffer's cap.",
            [({"stream": s}, v) for s, v in sorted(m["events_dropped_total"].items())],
        )
        family(
            "store_agent_buffer_events",
            "gauge",
            "Events not yet acknowledged upstream.",
            [({}, m["buffer_events"])],
        )
        family(
            "store_agent_buffer_bytes",
            "gauge",
            "Bytes of events not yet acknowledged upstream.",
            [({}, m["buffer_bytes"])],
        )
        family(
            "store_agent_buffer_oldest_unsent_seconds",
            "gauge",
            "Age of the oldest unsent event.",
            [({}, m["buffer_oldest_unsent_seconds"])],
        )
        family(
            "store_agent_mqtt_connected",
            "gauge",
            "1 while connected to the broker.",
            [({}, m["mqtt_connected"])],
        )
        family(
            "store_agent_buffer_writable",
            "gauge",
            "1 while the buffer takes commits (writer running, no failure).",
            [({}, m["buffer_writable"])],
        )
        family(
            "store_agent_thread_up",
            "gauge",
            "1 while the agent's thread runs.",
            [({"thread": t["thread"]}, t["value"]) for t in m["thread_up"]],
        )
        family(
            "store_agent_mqtt_reconnects_total",
            "counter",
            "Broker connections lost.",
            [({}, m["mqtt_reconnects_total"])],
        )
        family(
            "store_agent_mqtt_set_aside_batches_total",
            "counter",
            "Batches set aside (too big for the broker, refused, or dropping the connection).",
            [({}, m["mqtt_set_aside_batches_total"])],
        )
        family(
            "store_agent_buffer_set_aside_events",
            "gauge",
            "Events set aside in the buffer, kept and retried later.",
            [({}, m["buffer_set_aside_events"])],
        )
        family(
            "store_agent_commands_total",
            "counter",
            "Commands by name and outcome.",
            [({"name": c["name"], "outcome": c["outcome"]}, c["value"]) for c in m["commands_total"]],
        )
        family(
            "store_agent_device_up",
            "gauge",
            "1 while a device answers.",
            [({"kind": d["kind"], "name": d["name"]}, d["value"]) for d in m["device_up"]],
        )
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
