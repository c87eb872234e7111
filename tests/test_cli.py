"""The command line as a technician uses it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agent.core.envelope import Event
from tests.support.agentproc import STORE_AGENT, AgentProcess, prefill, write_config
from tests.support.mosquitto import free_port
from tests.support.subscriber import Collector


def cli(
    *args: str, timeout: float = 60, input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("STORE_AGENT")}
    return subprocess.run(
        [STORE_AGENT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=None if input is None else input.decode("latin-1"),
        env={**clean, **(env or {})},
    )


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
        (("decode", "ble", "zz"), "store-agent: decode ble: not hex: 'z' at byte 0"),
        (("decode", "ble", "02 01 0g"), "store-agent: decode ble: not hex: 'g' at byte 7"),
        (("decode", "ble", "0201"), "decode ble"),
        (("decode", "scan", "xyz"), "store-agent: decode scan: not hex: 'x' at byte 0"),
        (("decode", "scan", "5d4"), "store-agent: decode scan: not hex: an odd number of hex digits (3)"),
        (("decode", "escpos", "/nonexistent.bin"), "decode escpos"),
        (
            ("drain", "--timeout", "-1"),
            "store-agent: Invalid value for '--timeout': Input should be greater than or equal to 0.1",
        ),
    ],
)
def test_bad_usage_and_input_exit_2_with_one_line(args, needle):
    out = cli(*args)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
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
    out = subprocess.run(
        [STORE_AGENT, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"STORE_AGENT_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["buffer"]["events"] == 0


def test_decode_commands_print_one_json_object(tmp_path):
    ble = cli("decode", "ble", "0201061aff4c000215f7826da64fa24e988024bc5b71e0893e00640003c5")
    assert ble.returncode == 0
    frame = json.loads(ble.stdout)["frames"][0]
    assert frame == {
        "format": "ibeacon",
        "uuid": "f7826da6-4fa2-4e98-8024-bc5b71e0893e",
        "major": 100,
        "minor": 3,
        "tx_power": -59,
    }
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
    config = write_config(
        tmp_path / "agent.toml",
        tmp_path / "data",
        free_port(),
        '[[pos]]\nname = "front-1"\nport = "/dev/ttyNOPE9"\n',
    )
    out = cli("doctor", "--config", str(config))
    assert out.returncode == 1
    assert "FAIL" in out.stdout and "/dev/ttyNOPE9 does not exist" in out.stdout
    assert "broker" in out.stdout and "clock" in out.stdout


def test_doctor_prints_names_and_brackets_as_written(tmp_path):
    # rich markup ate "[mqtt]", and "scanner:x: ..." for a device named x became an emoji
    config = write_config(
        tmp_path / "agent.toml", tmp_path / "data", None, '[[scanner]]\nname = "x"\nport = "/dev/ttyNOPE8"\n'
    )
    out = cli("doctor", "--config", str(config))
    assert "WARN broker: no [mqtt] host: the agent only buffers" in out.stdout
    assert "FAIL scanner:x: /dev/ttyNOPE8 does not exist (unplugged? udev name?)" in out.stdout
    assert "\u274c" not in out.stdout


def test_doctor_warns_about_mqtt_3_1_1(tmp_path):
    config = write_config(
        tmp_path / "agent.toml", tmp_path / "data", free_port(), mqtt_extra='protocol = "3.1.1"\n'
    )
    out = cli("doctor", "--config", str(config))
    assert (
        "WARN mqtt protocol: 3.1.1: a broker that denies a publish still acknowledges it and drops it, "
        'so refused events are lost unseen; use protocol = "5"'
    ) in out.stdout
    five = cli(
        "doctor", "--config", str(write_config(tmp_path / "five.toml", tmp_path / "data", free_port()))
    )
    assert "mqtt protocol" not in five.stdout


# ---- refused before anything starts (exit 2, one line naming the key) -----------------------------


def refused(config: Path, env: dict[str, str] | None = None, command: str = "run") -> str:
    out = cli(command, "--config", str(config), timeout=30, env=env)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    return out.stderr.rstrip("\n")


@pytest.mark.parametrize(
    "section, key",
    [("mqtt", "password_file"), ("mqtt", "ca_file"), ("mqtt", "cert_file"), ("local_api", "token_file")],
)
def test_a_missing_file_refuses_to_start(tmp_path, section, key):
    missing = tmp_path / "nope" / key
    lines = {"mqtt": f'{key} = "{missing}"\n' if section == "mqtt" else ""}
    if key == "cert_file":
        (tmp_path / "client.key").write_text("k")
        lines["mqtt"] += f'key_file = "{tmp_path / "client.key"}"\n'
    config = write_config(
        tmp_path / "agent.toml",
        tmp_path / "data",
        free_port(),
        mqtt_extra=lines["mqtt"],
        api_port=free_port() if section == "local_api" else None,
    )
    if section == "local_api":
        config.write_text(
            config.read_text().replace("[local_api]\n", f'[local_api]\ntoken_file = "{missing}"\n')
        )
    for command in ("run", "drain"):
        assert refused(config, command=command) == (
            f"store-agent: {config}: {section}.{key}: {missing}: No such file or directory"
        )
    assert not (tmp_path / "data").exists()  # nothing started: not even the data directory


def test_a_data_dir_that_is_a_file_refuses_to_start(tmp_path):
    (tmp_path / "data").write_text("")
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", None)
    assert refused(config) == f"store-agent: {config}: agent.data_dir: {tmp_path / 'data'} is not a directory"


def test_a_bad_pattern_refuses_to_start(tmp_path):
    config = write_config(
        tmp_path / "agent.toml",
        tmp_path / "data",
        None,
        '[[pos]]\nname = "f"\nport = "sim:f"\nprotocol = "escpos"\n[pos.patterns]\ntotal = "(["\n',
    )
    assert refused(config).startswith(
        f"store-agent: {config}: pos[0].patterns: pattern for 'total' is not a valid regex"
    )


@pytest.mark.parametrize("host", ["192.0.2.7", "no-such-host.invalid"])
def test_plaintext_to_a_broker_off_this_machine_refuses_to_start(tmp_path, host):
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", free_port())
    config.write_text(config.read_text().replace('host = "127.0.0.1"', f'host = "{host}"'))
    assert refused(config) == (
        f"store-agent: {config}: mqtt.tls: the broker {host} is not on loopback and tls = false: the password "
        "and every event would cross the network in plaintext (set tls = true, or [mqtt] insecure_plaintext = true)"
    )


@pytest.mark.parametrize("host, extra", [("localhost", ""), ("192.0.2.7", "insecure_plaintext = true\n")])
def test_plaintext_starts_on_loopback_or_when_accepted(tmp_path, host, extra):
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", free_port(), mqtt_extra=extra)
    config.write_text(config.read_text().replace('host = "127.0.0.1"', f'host = "{host}"'))
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert agent.wait_log("running: tenant=acme"), agent.log_text()
    finally:
        assert agent.stop() == 0


def test_environment_overrides_reach_list_items(tmp_path):
    config = write_config(
        tmp_path / "agent.toml",
        tmp_path / "data",
        None,
        '[[pos]]\nname = "front-1"\nport = "/dev/ttyNOPE9"\n',
    )
    out = cli("doctor", "--config", str(config), env={"STORE_AGENT__POS__0__PORT": "/dev/ttyNOPE7"})
    assert "FAIL pos:front-1: /dev/ttyNOPE7 does not exist" in out.stdout, out


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("STORE_AGENT__BOGUS__X", "1", "STORE_AGENT__BOGUS__X: bogus is not a key of the config"),
        (
            "STORE_AGENT__LOCAL_API__STREAMS",
            "app",
            "STORE_AGENT__LOCAL_API__STREAMS: local_api.streams takes a JSON list, e.g. [\"app\"] (got 'app')",
        ),
        (
            "STORE_AGENT__LOCAL_API__STREAMS",
            '["pos"]',
            "STORE_AGENT__LOCAL_API__STREAMS (local_api.streams): pos: streams of the drivers and the agent "
            "cannot be admitted from the local API",
        ),
    ],
)
def test_environment_errors_exit_2_naming_the_variable(tmp_path, variable, value, message):
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", None)
    for command in ("run", "status"):
        assert refused(config, {variable: value}, command) == f"store-agent: {config}: {message}"


def test_drain_prints_brackets_as_written(tmp_path):
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", None)
    out = cli("drain", "--config", str(config))
    assert out.returncode == 0, out
    assert out.stderr == "no [mqtt] host configured: nothing can be sent; 0 events are left\n"


def test_status_prints_device_names_as_written(tmp_path):
    api = free_port()
    config = write_config(
        tmp_path / "agent.toml",
        tmp_path / "data",
        None,
        '[[scanner]]\nname = "[b]desk"\nport = "sim:x"\n',
        api_port=api,
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert agent.wait_log("running: tenant=acme"), agent.log_text()
        out = cli("status", "--config", str(config))
        assert out.returncode == 0, out
        assert "scanner:[b]desk" in out.stdout, out.stdout  # markup would take "[b]" for bold
    finally:
        assert agent.stop() == 0


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "[local_api]\n",
            '[local_api]\nstreams = ["app", "pos"]\n',
            "local_api.streams: pos: streams of the drivers and the agent cannot be admitted from the local API",
        ),
        (
            "[local_api]\n",
            '[local_api]\nstreams = ["x#"]\n',
            "local_api.streams[0]: String should match pattern '^[A-Za-z0-9_-]{1,64}$' (got 'x#')",
        ),
        ('store = "s1"', 'store = "s\\u0000"', "agent.store: String should match pattern"),
        ('host = "127.0.0.1"', 'host = ""', "mqtt.host: String should have at least 1 character (got '')"),
        ("tls = false", 'tls = "yes"', "mqtt.tls: Input should be a valid boolean (got 'yes')"),
    ],
)
def test_config_that_must_not_be_accepted_exits_2(tmp_path, old, new, message):
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", free_port())
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    assert refused(config).startswith(f"store-agent: {config}: {message}")
