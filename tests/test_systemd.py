import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.agentproc import STORE_AGENT

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "store-agent.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_what_the_agent_relies_on():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] and s["StateDirectory"] == ["store-agent"]
    assert "dialout" in s["SupplementaryGroups"][0]
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    assert "AF_BLUETOOTH" in s["RestrictAddressFamilies"][0] and "AF_INET" in s["RestrictAddressFamilies"][0]
    assert any("ttyUSB" in d for d in s["DeviceAllow"]) and any("ttyACM" in d for d in s["DeviceAllow"])
    assert "PrivateDevices" not in s, "PrivateDevices would hide the serial ports"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed here")
def test_systemd_analyze_verify_passes(tmp_path):
    # the packaged path does not exist here: point ExecStart at this checkout's entry point
    entry = STORE_AGENT
    unit = tmp_path / "store-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/store-agent/bin/store-agent", str(entry)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line for line in (result.stdout + result.stderr).splitlines() if "store-agent.service" in line
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
