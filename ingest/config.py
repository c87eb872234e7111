"""store-agent-ingest's configuration (contract section 10): TOML validated once, at start.

Path: `--config`, else `$STORE_AGENT_INGEST_CONFIG`, else `/etc/store-agent/ingest.toml`. Any key
can be overridden as `STORE_AGENT_INGEST__SECTION__KEY=value`. The conventions are the agent's
(agent/config.py): frozen models, unknown keys refused, errors as one line naming file and key.

Decisions:
- Reading, parsing and the environment overrides are the agent's own loader (`load_config`,
  `parse_config` with this prefix), not a copy and not pydantic-settings: the overrides follow
  the agent's rules (text as is, other types as JSON, `null` for none, an unknown name is an
  error, errors name the variable), and `ConfigError`, `describe` and `read_secret` come along.
- A broker off this machine needs TLS unless `insecure_plaintext = true`; loopback is the agent's
  rule (`resolves_to_loopback`: every resolved address loopback, a name that does not resolve is
  not), checked when the config is validated.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.config import ConfigError, Section, load_config, parse_config, read_secret, resolves_to_loopback
from agent.config import config_path as _config_path

DEFAULT_PATH = Path("/etc/store-agent/ingest.toml")
ENV_PATH = "STORE_AGENT_INGEST_CONFIG"
ENV_PREFIX = "STORE_AGENT_INGEST__"

__all__ = ["ConfigError", "IngestConfig", "config_path", "load", "parse"]


class MqttSection(Section):
    """The broker or cluster the agents publish to; keys as in the agent's [mqtt]."""

    host: str = Field(min_length=1)
    port: int = Field(default=8883, ge=1, le=65535)
    tls: bool = True
    insecure_plaintext: bool = False
    topic_prefix: str = Field(default="retail", min_length=1, pattern=r"^[^#+]+$")
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)

    @model_validator(mode="after")
    def _checks(self) -> MqttSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate and its key)")
        if not self.tls and not self.insecure_plaintext and not resolves_to_loopback(self.host, self.port):
            raise ValueError("tls = false to a broker not on loopback also needs insecure_plaintext = true")
        return self


class IngestSection(Section):
    dsn: str | None = None
    dsn_file: Path | None = None
    group: str = Field(default="ingest", min_length=1, pattern=r"^[^/#+\s]+$")
    # unique per instance: it names the persistent session that holds this instance's unacked messages
    client_id: str = Field(default_factory=lambda: f"ingest-{socket.gethostname()}", min_length=1)
    session_expiry_s: int = Field(default=7 * 86400, ge=1, le=0xFFFFFFFF)
    receive_maximum: int = Field(default=200, ge=1, le=65535)  # unacked messages the broker may send
    batch_events: int = Field(default=20_000, ge=1)  # events per transaction at most
    batch_wait_ms: int = Field(default=100, ge=0, le=60_000)  # how long a transaction waits to fill
    writers: int = Field(default=2, ge=1, le=32)  # PostgreSQL connections committing batches in parallel
    retention_days: int = Field(default=0, ge=0)  # 0: keep every day partition

    @model_validator(mode="after")
    def _one_dsn(self) -> IngestSection:
        if (self.dsn is None) == (self.dsn_file is None):
            raise ValueError("give exactly one of dsn and dsn_file")
        return self


class LogSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class IngestConfig(BaseModel):
    """The whole ingest.toml (environment overrides are applied by `parse`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mqtt: MqttSection
    ingest: IngestSection
    log: LogSection = LogSection()

    def dsn(self) -> str:
        """The connection string, from `dsn` or read from `dsn_file`."""
        if self.ingest.dsn is not None:
            return self.ingest.dsn
        secret = read_secret(self.ingest.dsn_file)
        if not secret:
            raise ConfigError(f"{self.ingest.dsn_file}: ingest.dsn_file is empty")
        return secret


def config_path(cli_path: str | os.PathLike[str] | None) -> Path:
    """Where the config is read from: the flag, else `$STORE_AGENT_INGEST_CONFIG`, else the default."""
    return _config_path(cli_path, env_path=ENV_PATH, default=DEFAULT_PATH)


def load(path: Path) -> IngestConfig:
    """Read and validate a config file; ConfigError with one line naming file and key."""
    return load_config(IngestConfig, path, prefix=ENV_PREFIX)


def parse(raw: bytes, name: str, environ: Mapping[str, str] | None = None) -> IngestConfig:
    """Validate TOML bytes, plus the environment's overrides (`os.environ` by default), into the config."""
    return parse_config(IngestConfig, raw, name, environ, prefix=ENV_PREFIX)
