"""The command line as a technician uses it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess

import pytest

from agent.core.envelope import Event
from tests.support.agentproc import STORE_AGENT, prefill, write_config
from tests.support.mosquitto import free_port
from tests.support.subscriber import Collector


def cli(*args: str, timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORE_AGENT, *args], capture_output=True, text=True, timeout=timeout,
                          input=None if input is None else input.decode("latin-1"))


def test_help_lists_the_contracts_commands():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("run", "status", "doctor", "drain", "decode"):
        assert command in out.stdout
    decode = cli("decode", "--help").stdout
    for kind in ("ble", "scan", "escpos"):
        assert kind in decode


@pytest.mark.parametrize(
    "args, needle",
    [
        (("run", "--config", "/nonexistent/agent.toml"), "no such file"),
        (("status", "--bogus"), "No such option"),
        (("nonsense",), "No such command"),
        (("decode", "ble", "zz"), "decode ble"),
        (("decode", "ble", "0201"), "decode ble"),
        (("decode", "scan", "xyz"), "decode scan"),
        (("decode", "escpos", "/nonexistent.bin"), "decode escpos"),
        (("drain", "--timeout", "-1"), ""),
    ],
)
def test_bad_usage_and_input_exit_2_with_one_line(args, needle):
    out = cli(*args)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert needle in out.stderr


def test_bad_config_names_file_and_key(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ntenant = "a"\nstore = "s"\n[mqtt]\nport = "eighty"\n')
    out = cli("run", "--config", str(config))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert str(config) in out.stderr and "mqtt.port" in out.stderr


def test_config_from_environment_variable(tmp_path):
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", None)
    out = subprocess.run([STORE_AGENT, "status", "--json"], capture_output=True, text=True, timeout=30,
                         env={"STORE_AGENT_CONFIG": str(config), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["buffer"]["events"] == 0


def test_decode_commands_print_one_json_object(tmp_path):
    ble = cli("decode", "ble", "0201061aff4c000215f7826da64fa24e988024bc5b71e0893e00640003c5")
    assert ble.returncode == 0
    frame = json.loads(ble.stdout)["frames"][0]
    assert frame == {"format": "ibeacon", "uuid": "f7826da6-4fa2-4e98-8024-bc5b71e0893e", "major": 100,
                     "minor": 3, "tx_power": -59}
    scan = json.loads(cli("decode", "scan", b"]E05901234123457\r\n".hex()).stdout)
    assert scan["gtin"] == "05901234123457" and scan["valid"] is True
    receipt = tmp_path / "r.bin"
    receipt.write_bytes(b"\x1b@Hello\nTOTAL 12.50\n\x1dV\x00")
    out = json.loads(cli("decode", "escpos", str(receipt)).stdout)
    assert out == {"receipts": [{"lines": ["Hello", "TOTAL 12.50"]}]}


def test_status_without_a_running_agent_reads_the_buffer(tmp_path):
    data = tmp_path / "data"
    prefill(data, [Event("pos.sale", {}, "pos:1") for _ in range(7)])
    config = write_config(tmp_path / "agent.toml", data, free_port())
    state = json.loads(cli("status", "--json", "--config", str(config)).stdout)
    assert state["running"] is False and state["buffer"]["events"] == 7
    table = cli("status", "--config", str(config))
    assert table.returncode == 0 and "7 events" in table.stdout


def test_drain_without_a_running_agent_sends_the_backlog(tmp_path, broker):
    data = tmp_path / "data"
    ids = prefill(data, [Event("pos.sale", {"i": i}, "pos:1") for i in range(2000)], batch=2000)
    collector = Collector(broker.port, "retail/acme/s1/a1/up/#").start()
    config = write_config(tmp_path / "agent.toml", data, broker.port)
    try:
        out = cli("drain", "--timeout", "30", "--config", str(config))
        assert out.returncode == 0, out.stderr
        assert "buffer empty: 2000 events sent" in out.stderr
        assert collector.wait_for(lambda c: c.ids() >= set(ids), 10)
    finally:
        collector.stop()


def test_drain_with_the_broker_down_says_what_is_left(tmp_path):
    data = tmp_path / "data"
    prefill(data, [Event("pos.sale", {}, "pos:1") for _ in range(3)])
    config = write_config(tmp_path / "agent.toml", data, free_port())
    out = cli("drain", "--timeout", "1", "--config", str(config))
    assert out.returncode == 1
    assert "3 events are left" in out.stderr


def test_doctor_reports_each_check(tmp_path):
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", free_port(),
                          '[[pos]]\nname = "front-1"\nport = "/dev/ttyNOPE9"\n')
    out = cli("doctor", "--config", str(config))
    assert out.returncode == 1
    assert "FAIL" in out.stdout and "/dev/ttyNOPE9 does not exist" in out.stdout
    assert "broker" in out.stdout and "clock" in out.stdout
