import pytest

from agent.config import ConfigError, check_start, load, parse, resolves_to_loopback

BASE = b'[agent]\ntenant = "acme"\nstore = "sh-0012"\nid = "till-pc-1"\ndata_dir = "/tmp/x"\n'


def error_of(raw: bytes, monkeypatch=None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw, "agent.toml")
    message = str(info.value)
    assert "\n" not in message, "one line"
    assert message.startswith("agent.toml: ")
    return message


@pytest.fixture(autouse=True)
def _no_agent_environment(monkeypatch):
    """The tests' own overrides only: none from the shell that runs them."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("STORE_AGENT__"):
            monkeypatch.delenv(name)


def test_minimal_config_has_sane_defaults():
    cfg = parse(BASE, "agent.toml")
    assert cfg.mqtt.tls is True and cfg.mqtt.port == 8883
    assert cfg.local_api.listen == "127.0.0.1:8750" and cfg.local_api.streams == ["app"]
    assert cfg.buffer.max_bytes == 1 << 30
    assert cfg.topic_base == "retail/acme/sh-0012/till-pc-1"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            b'[mqtt]\nport = "x"\n',
            "mqtt.port: Input should be a valid integer, unable to parse string as an integer (got 'x')",
        ),
        (b"[mqtt]\nprot = 1\n", "mqtt.prot: unknown key"),
        (b"[bogus]\na = 1\n", "bogus: unknown key"),
        (
            b'[[pos]]\nname = "f"\nport = "/dev/x"\nbaudrate = "fast"\n',
            "pos[0].baudrate: Input should be a valid integer, unable to parse string as an integer (got 'fast')",
        ),
        (b'[[pos]]\nname = "f"\n', "pos[0].port: required key is missing"),
        (
            b'[[pos]]\nname = "f"\nport = "/dev/x"\nprotocol = "xml"\n',
            "pos[0].protocol: Input should be 'stxetx' or 'escpos' (got 'xml')",
        ),
        (
            b'[mqtt]\ncert_file = "/c.pem"\n',
            "mqtt: cert_file and key_file go together (client certificate and its key)",
        ),
        (
            b'[local_api]\nlisten = "8750"\n',
            "local_api.listen: listen must be HOST:PORT, e.g. 127.0.0.1:8750",
        ),
    ],
)
def test_errors_name_the_key(extra, expected):
    assert error_of(BASE + extra) == f"agent.toml: {expected}"


def test_missing_required_keys():
    assert error_of(b'[agent]\nstore = "s"\n') == "agent.toml: agent.tenant: required key is missing"


def test_toml_syntax_error_names_line():
    assert (
        error_of(b"[agent]\ntenant = \n")
        == "agent.toml: TOML syntax error: Invalid value (at line 2, column 10)"
    )


def test_not_utf8_names_byte_offset():
    assert error_of(b"[agent]\n\xff = 1\n") == "agent.toml: not UTF-8 at byte 8"


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
    assert error_of(BASE) == (
        "agent.toml: STORE_AGENT__MQTT__PORT (mqtt.port): Input should be a valid integer, "
        "unable to parse string as an integer (got 'abc')"
    )


def test_null_host_means_buffer_only(monkeypatch):
    monkeypatch.setenv("STORE_AGENT__MQTT__HOST", "null")
    assert parse(BASE + b'[mqtt]\nhost = "x"\n', "agent.toml").mqtt.host is None


def test_topic_levels_cannot_hold_wildcards():
    assert error_of(BASE.replace(b"sh-0012", b"sh/0012")).startswith(
        "agent.toml: agent.store: String should match pattern"
    )


@pytest.mark.parametrize("path", ["config/agent.toml", "config/demo.toml"])
def test_shipped_configs_are_valid(path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = load(root / path)
    expected = {
        "config/agent.toml": ("acme", "sh-0012", "mqtt.example.com", True),
        "config/demo.toml": ("demo", "sh-0001", "127.0.0.1", False),
    }[path]
    assert (cfg.agent.tenant, cfg.agent.store, cfg.mqtt.host, cfg.mqtt.tls) == expected
    assert cfg.mqtt.insecure_plaintext is False


# ---- what must not be accepted ----------------------------------------------------------------


@pytest.mark.parametrize(
    "streams, needle",
    [
        ('["app", "pos"]', "pos: streams of the drivers and the agent cannot be admitted"),
        ('["system"]', "system: streams of the drivers and the agent"),
        ('["scan"]', "scan: streams of the drivers and the agent"),
        ('["x#"]', "local_api.streams[0]: String should match pattern"),
        ('["app", "a+b"]', "local_api.streams[1]: String should match pattern"),
        ('["a/b"]', "local_api.streams[0]: String should match pattern"),
        ('["a.b"]', "local_api.streams[0]: String should match pattern"),
    ],
)
def test_local_api_streams_of_the_agent_or_with_topic_characters_are_refused(streams, needle):
    message = error_of(BASE + f"[local_api]\nstreams = {streams}\n".encode())
    assert needle in message, message


@pytest.mark.parametrize("key", ["tenant", "store", "id"])
@pytest.mark.parametrize("bad", ["a\\u0000b", "a\\u0007b", "a\\u007fb", "a/b", "a#", "+", "a b"])
def test_topic_levels_refuse_control_characters_and_wildcards(key, bad):
    raw = b'[agent]\ntenant = "t"\nstore = "s"\nid = "i"\n'.replace(
        f'{key} = "{key[0]}"'.encode(), f'{key} = "{bad}"'.encode()
    )
    assert f"agent.{key}: String should match pattern" in error_of(raw)


def test_empty_host_is_refused():
    assert "mqtt.host: String should have at least 1 character" in error_of(BASE + b'[mqtt]\nhost = ""\n')


@pytest.mark.parametrize(
    "extra, key",
    [
        (b'[mqtt]\ntls = "yes"\n', "mqtt.tls"),
        (b"[mqtt]\ntls = 1\n", "mqtt.tls"),
        (b'[mqtt]\ninsecure_plaintext = "true"\n', "mqtt.insecure_plaintext"),
        (b'[local_api]\nenabled = "no"\n', "local_api.enabled"),
        (b'[ble]\nenabled = "yes"\n', "ble.enabled"),
    ],
)
def test_booleans_are_strict(extra, key):
    assert f"{key}: Input should be a valid boolean" in error_of(BASE + extra)


def test_bad_regex_and_unknown_encoding_are_found_at_load():
    pos = b'[[pos]]\nname = "f"\nport = "/dev/x"\nprotocol = "escpos"\n'
    message = error_of(BASE + pos + b"[pos.patterns]\ntotal = 'TOTAL (['\n")
    assert "pos[0].patterns: pattern for 'total' is not a valid regex" in message
    assert "pos[0].encoding: unknown encoding 'klingon'" in error_of(BASE + pos + b'encoding = "klingon"\n')
    assert "pos[0]: encoding 'utf-16' is not ASCII-compatible" in error_of(
        BASE + pos + b'encoding = "utf-16"\n'
    )


# ---- environment overrides ------------------------------------------------------------------------

POS = b'[[pos]]\nname = "front-1"\nport = "/dev/ttyUSB0"\n[[scanner]]\nname = "desk"\nport = "/dev/ttyACM0"\n'


def test_environment_reaches_keys_inside_lists_of_tables(monkeypatch):
    monkeypatch.setenv("STORE_AGENT__POS__0__PORT", "/dev/ttyUSB7")
    monkeypatch.setenv("STORE_AGENT__POS__0__BAUDRATE", "19200")
    monkeypatch.setenv("STORE_AGENT__SCANNER__0__TERMINATOR", "crlf")
    monkeypatch.setenv("STORE_AGENT__POS__1__NAME", "front-2")  # index = length adds a table
    monkeypatch.setenv("STORE_AGENT__POS__1__PORT", "/dev/ttyUSB8")
    cfg = parse(BASE + POS, "agent.toml")
    assert [(p.name, p.port, p.baudrate) for p in cfg.pos] == [
        ("front-1", "/dev/ttyUSB7", 19200),
        ("front-2", "/dev/ttyUSB8", 9600),
    ]
    assert cfg.scanner[0].terminator == "crlf"


def test_environment_sets_booleans_numbers_and_null(monkeypatch):
    monkeypatch.setenv("STORE_AGENT__MQTT__TLS", "false")
    monkeypatch.setenv("STORE_AGENT__MQTT__BACKOFF_MAX_S", "2.5")
    monkeypatch.setenv("STORE_AGENT__MQTT__PROTOCOL", "5")
    monkeypatch.setenv("STORE_AGENT__AGENT__STORE", "0012")  # text stays text, leading zero kept
    cfg = parse(BASE, "agent.toml")
    assert (cfg.mqtt.tls, cfg.mqtt.backoff_max_s, cfg.mqtt.protocol) == (False, 2.5, "5")
    assert cfg.agent.store == "0012"


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("STORE_AGENT__BOGUS__X", "1", "agent.toml: STORE_AGENT__BOGUS__X: bogus is not a key of the config"),
        (
            "STORE_AGENT__MQTT__PROT",
            "1",
            "agent.toml: STORE_AGENT__MQTT__PROT: mqtt.prot is not a key of the config",
        ),
        (
            "STORE_AGENT__POS__3__PORT",
            "/dev/x",
            "agent.toml: STORE_AGENT__POS__3__PORT: pos[3]: index past the end (the list has 1 items)",
        ),
        (
            "STORE_AGENT__LOCAL_API__STREAMS",
            "app",
            "agent.toml: STORE_AGENT__LOCAL_API__STREAMS: local_api.streams takes a JSON list, e.g. [\"app\"] (got 'app')",
        ),
        (
            "STORE_AGENT__MQTT__TLS",
            "yes",
            "agent.toml: STORE_AGENT__MQTT__TLS: mqtt.tls takes true or false (got 'yes')",
        ),
        (
            "STORE_AGENT__MQTT__PORT",
            "abc",
            "agent.toml: STORE_AGENT__MQTT__PORT (mqtt.port): Input should be a valid integer, unable to parse "
            "string as an integer (got 'abc')",
        ),
        (
            "STORE_AGENT__POS__0__BAUDRATE",
            "-1",
            "agent.toml: STORE_AGENT__POS__0__BAUDRATE (pos[0].baudrate): Input should be greater than 0 (got -1)",
        ),
        (
            "STORE_AGENT__LOCAL_API__STREAMS",
            '["pos"]',
            "agent.toml: STORE_AGENT__LOCAL_API__STREAMS (local_api.streams): pos: streams of the "
            "drivers and the agent cannot be admitted from the local API",
        ),
    ],
)
def test_environment_errors_name_the_variable(monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    assert error_of(BASE + POS) == expected


def test_check_start_refuses_a_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("")
    cfg = parse(BASE.replace(b"/tmp/x", str(tmp_path / "data").encode()), "agent.toml")
    with pytest.raises(ConfigError) as info:
        check_start(cfg)
    assert str(info.value) == f"agent.data_dir: {tmp_path / 'data'} is not a directory"


@pytest.mark.parametrize("key", ["password_file", "ca_file"])
def test_check_start_names_a_missing_mqtt_file(tmp_path, key):
    cfg = parse(BASE + f'[mqtt]\nhost = "127.0.0.1"\n{key} = "{tmp_path}/nope"\n'.encode(), "agent.toml")
    with pytest.raises(ConfigError) as info:
        check_start(cfg)
    assert str(info.value) == f"mqtt.{key}: {tmp_path}/nope: No such file or directory"


def test_loopback_is_judged_by_the_resolved_address():
    assert (
        resolves_to_loopback("127.0.0.1")
        and resolves_to_loopback("127.1.2.3")
        and resolves_to_loopback("::1")
    )
    assert resolves_to_loopback("localhost")  # a name that resolves to 127.0.0.1 / ::1
    assert not resolves_to_loopback("192.0.2.7")
    assert not resolves_to_loopback("no-such-host.invalid")  # resolution failing is not loopback


@pytest.mark.parametrize(
    "mqtt, refused",
    [
        ('host = "192.0.2.7"\nport = 1883\ntls = false\n', True),
        ('host = "no-such-host.invalid"\nport = 1883\ntls = false\n', True),
        ('host = "192.0.2.7"\nport = 1883\ntls = false\ninsecure_plaintext = true\n', False),
        ('host = "localhost"\nport = 1883\ntls = false\n', False),
        ('host = "192.0.2.7"\n', False),  # TLS
    ],
)
def test_plaintext_to_a_broker_off_this_machine_is_refused(mqtt, refused):
    cfg = parse(BASE + f"[mqtt]\n{mqtt}".encode(), "agent.toml")
    if refused:
        with pytest.raises(
            ConfigError, match=r"^mqtt\.tls: the broker .* is not on loopback and tls = false"
        ):
            check_start(cfg)
    else:
        check_start(cfg)
