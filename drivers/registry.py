"""Which drivers the config asks for, built and ready to run; `sim:` ports get simulated devices.

A port written `sim:NAME` is a pseudo-terminal the agent opens itself, with a simulated device on
the other end (the demo store): the driver reads and writes the same way it does a real port.
"""

from __future__ import annotations

import os
import tty
from collections.abc import Awaitable, Callable

from agent.config import AgentConfig, ConfigError
from agent.sink import DeviceHealth, EventSink

Runner = Callable[[], Awaitable[object]]


class SimulatedPorts:
    """Pseudo-terminals for `sim:` ports: the driver gets the slave's path, a simulator the master."""

    def __init__(self) -> None:
        self.masters: dict[str, int] = {}
        self._slaves: list[int] = []

    def resolve(self, port: str) -> str:
        """The device path to open for `port` (a `sim:` port becomes a fresh pty)."""
        if not port.startswith("sim:"):
            return port
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        os.set_blocking(master, False)
        self.masters[port] = master
        self._slaves.append(slave)  # kept open so the pty survives the driver reopening it
        return os.ttyname(slave)


def build_drivers(cfg: AgentConfig, sink: EventSink, health: DeviceHealth) -> list[tuple[str, Runner]]:
    """(name, runner) for every configured device, simulators included."""
    sims = SimulatedPorts()
    runners: list[tuple[str, Runner]] = []
    rate = cfg.simulator.pos_rate_per_min if cfg.simulator else 20.0
    for pos in cfg.pos:
        port = sims.resolve(pos.port)
        if pos.protocol == "stxetx":
            from drivers.pos import StxEtxDriver

            runners.append(
                (f"pos:{pos.name}", StxEtxDriver(pos.model_copy(update={"port": port}), sink, health).run)
            )
            if pos.port in sims.masters:
                from drivers.sim.pos import PosSimulator

                runners.append(
                    (f"sim:pos:{pos.name}", PosSimulator(sims.masters[pos.port], pos.name, rate).run)
                )
        else:
            from drivers.receipt_tap import ReceiptTap

            forward = sims.resolve(pos.forward_to) if pos.forward_to else None
            tap_cfg = pos.model_copy(update={"port": port, "forward_to": forward})
            runners.append((f"pos:{pos.name}", ReceiptTap(tap_cfg, sink, health).run))
            if pos.port in sims.masters:
                from drivers.sim.devices import PrintingPosSimulator

                runners.append(
                    (f"sim:printer-pos:{pos.name}", PrintingPosSimulator(sims.masters[pos.port], rate).run)
                )
            if pos.forward_to and pos.forward_to in sims.masters:
                from drivers.sim.devices import PrinterSimulator

                runners.append(
                    (f"sim:printer:{pos.name}", PrinterSimulator(sims.masters[pos.forward_to]).run)
                )
    for scanner in cfg.scanner:
        port = sims.resolve(scanner.port)
        from drivers.scanner import ScannerDriver

        runners.append(
            (
                f"scanner:{scanner.name}",
                ScannerDriver(scanner.model_copy(update={"port": port}), sink, health).run,
            )
        )
        if scanner.port in sims.masters:
            from drivers.sim.devices import ScannerSimulator

            runners.append((f"sim:scanner:{scanner.name}", ScannerSimulator(sims.masters[scanner.port]).run))
    if cfg.ble is not None and cfg.ble.enabled:
        from drivers.ble import BleDriver

        try:
            runners.append(("ble", BleDriver(cfg.ble, sink, health).run))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ble: {exc}") from None
    return runners
