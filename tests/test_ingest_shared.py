"""What store-agent-ingest shares with the agent (contract sections 1 and 10), without PostgreSQL.

The config goes through the agent's loader: the agent's environment override rules under the
ingest's own prefix, the agent's messages, the agent's loopback rule (in-process). The command
line goes through the agent's `Cli`: `--version` and usage errors as section 1 says (subprocess).
The ingest's config errors as `run` reports them are in test_ingest_e2e.py.
"""

import subprocess
from pathlib import Path

import pytest

from agent import __version__
from agent.config import parse as parse_agent
from agent.config import resolves_to_loopback
from ingest.config import ConfigError, load
from tests.support.ingestproc import STORE_AGENT_INGEST

GOOD = '[mqtt]\nhost = "127.0.0.1"\n[ingest]\ndsn = "x"\n'
AGENT = b'[agent]\ntenant = "acme"\nstore = "s1"\n'


def _load(tmp_path: Path, toml: str | bytes = GOOD):
    path = tmp_path / "ingest.toml"
    path.write_bytes(toml.encode() if isinstance(toml, str) else toml)
    return load(path)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "::1", "[::1]", "127.1", "localhost", "192.0.2.7", "no-such-host.invalid"]
)
def test_plaintext_broker_is_judged_by_the_agents_loopback_rule(tmp_path: Path, host: str) -> None:
    toml = f'[mqtt]\nhost = "{host}"\ntls = false\n[ingest]\ndsn = "x"\n'
    if resolves_to_loopback(host):
        assert _load(tmp_path, toml).mqtt.host == host
    else:
        with pytest.raises(ConfigError, match="not on loopback also needs insecure_plaintext = true"):
            _load(tmp_path, toml)
        assert not _load(
            tmp_path, toml.replace("tls = false", "tls = false\ninsecure_plaintext = true")
        ).mqtt.tls


def test_an_override_that_names_no_key_is_an_error_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORE_AGENT_INGEST__BOGUS__X", "1")
    with pytest.raises(ConfigError, match=r"ingest\.toml: STORE_AGENT_INGEST__BOGUS__X: bogus is not a key"):
        _load(tmp_path)


def test_a_bad_override_is_named_with_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORE_AGENT_INGEST__MQTT__PORT", "abc")
    with pytest.raises(ConfigError, match=r"ingest\.toml: STORE_AGENT_INGEST__MQTT__PORT \(mqtt\.port\): "):
        _load(tmp_path)


def test_overrides_take_text_as_it_is_json_otherwise_and_null_for_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORE_AGENT_INGEST__INGEST__GROUP", "0012")
    monkeypatch.setenv("STORE_AGENT_INGEST__MQTT__PORT", "1884")
    monkeypatch.setenv("STORE_AGENT_INGEST__MQTT__USERNAME", "null")
    cfg = _load(tmp_path, GOOD.replace("[ingest]", 'username = "u"\n[ingest]'))
    assert (cfg.ingest.group, cfg.mqtt.port, cfg.mqtt.username) == ("0012", 1884, None)


def test_the_agents_and_the_ingests_prefixes_do_not_reach_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # STORE_AGENT__ is a prefix of neither STORE_AGENT_INGEST__ nor the other way round
    monkeypatch.setenv("STORE_AGENT__MQTT__PORT", "1")
    monkeypatch.setenv("STORE_AGENT__BOGUS", "1")
    assert _load(tmp_path).mqtt.port == 8883
    ingest_only = {"STORE_AGENT_INGEST__MQTT__PORT": "2", "STORE_AGENT_INGEST__BOGUS": "1"}
    assert parse_agent(AGENT, "agent.toml", ingest_only).mqtt.port == 8883


def test_bytes_that_are_not_utf8_are_said_as_the_agent_says_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ingest\.toml: not UTF-8 at byte 2$"):
        _load(tmp_path, b"# \xff\n" + GOOD.encode())


@pytest.mark.parametrize(
    ("args", "code", "out", "err"),
    [
        (["--version"], 0, f"store-agent-ingest {__version__}\n", ""),
        (["nonsense"], 2, "", "store-agent-ingest: No such command 'nonsense'.\n"),
        (["run", "--bogus"], 2, "", "store-agent-ingest: No such option: --bogus\n"),
    ],
)
def test_version_and_usage_errors_as_the_agents(args: list[str], code: int, out: str, err: str) -> None:
    result = subprocess.run([STORE_AGENT_INGEST, *args], capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stdout, result.stderr) == (code, out, err)
