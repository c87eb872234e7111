import pytest

from agent.config import ConfigError, load, parse

BASE = b'[agent]\ntenant = "acme"\nstore = "sh-0012"\nid = "till-pc-1"\ndata_dir = "/tmp/x"\n'


def error_of(raw: bytes, monkeypatch=None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw, "agent.toml")
    message = str(info.value)
    assert "\n" not in message, "one line"
    assert message.startswith("agent.toml: ")
    return message


def test_minimal_config_has_sane_defaults():
    cfg = parse(BASE, "agent.toml")
    assert cfg.mqtt.tls is True and cfg.mqtt.port == 8883
    assert cfg.local_api.listen == "127.0.0.1:8750" and cfg.local_api.streams == ["app"]
    assert cfg.buffer.max_bytes == 1 << 30
    assert cfg.topic_base == "retail/acme/sh-0012/till-pc-1"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (b"[mqtt]\nport = \"x\"\n", "mqtt.port: Input should be a valid integer"),
        (b"[mqtt]\nprot = 1\n", "mqtt.prot: unknown key"),
        (b"[bogus]\na = 1\n", "bogus: unknown key"),
        (b"[[pos]]\nname = \"f\"\nport = \"/dev/x\"\nbaudrate = \"fast\"\n", "pos[0].baudrate"),
        (b"[[pos]]\nname = \"f\"\n", "pos[0].port: required key is missing"),
        (b"[[pos]]\nname = \"f\"\nport = \"/dev/x\"\nprotocol = \"xml\"\n", "pos[0].protocol"),
        (b"[mqtt]\ncert_file = \"/c.pem\"\n", "cert_file and key_file go together"),
        (b"[local_api]\nlisten = \"8750\"\n", "local_api.listen"),
    ],
)
def test_errors_name_the_key(extra, expected):
    assert expected in error_of(BASE + extra)


def test_missing_required_keys():
    assert "agent.tenant: required key is missing" in error_of(b'[agent]\nstore = "s"\n')


def test_toml_syntax_error_names_line():
    assert "line 2" in error_of(b"[agent]\ntenant = \n")


def test_not_utf8_names_byte_offset():
    assert "byte offset 8" in error_of(b"[agent]\n\xff = 1\n")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.toml")


def test_environment_overrides_any_key(monkeypatch):
    monkeypatch.setenv("STORE_AGENT__MQTT__PORT", "1999")
    monkeypatch.setenv("STORE_AGENT__MQTT__HOST", "broker.local")
    monkeypatch.setenv("STORE_AGENT__AGENT__STORE", "sh-0099")
    monkeypatch.setenv("STORE_AGENT__LOCAL_API__STREAMS", '["app", "counter"]')
    cfg = parse(BASE + b'[mqtt]\nhost = "x"\ntls = false\n', "agent.toml")
    assert (cfg.mqtt.port, cfg.mqtt.host, cfg.mqtt.tls) == (1999, "broker.local", False)
    assert cfg.agent.store == "sh-0099" and cfg.agent.tenant == "acme"
    assert cfg.local_api.streams == ["app", "counter"]


def test_environment_override_errors_are_one_line(monkeypatch):
    monkeypatch.setenv("STORE_AGENT__MQTT__PORT", "abc")
    assert "mqtt.port" in error_of(BASE)


def test_null_host_means_buffer_only(monkeypatch):
    monkeypatch.setenv("STORE_AGENT__MQTT__HOST", "null")
    assert parse(BASE + b'[mqtt]\nhost = "x"\n', "agent.toml").mqtt.host is None


def test_topic_levels_cannot_hold_wildcards():
    assert "agent.store" in error_of(BASE.replace(b"sh-0012", b"sh/0012"))


@pytest.mark.parametrize("path", ["config/agent.toml", "config/demo.toml"])
def test_shipped_configs_are_valid(path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = load(root / path)
    assert cfg.agent.tenant
