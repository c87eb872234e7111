"""store-agent-ingest's configuration (contract section 10): TOML validated once, at start.

Path: `--config`, else `$STORE_AGENT_INGEST_CONFIG`, else `/etc/store-agent/ingest.toml`. Any key
can be overridden as `STORE_AGENT_INGEST__SECTION__KEY=value`. The conventions are the agent's
(agent/config.py): frozen models, unknown keys refused, errors as one line naming file and key;
`ConfigError`, `describe` and `read_secret` are reused from there rather than copied.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.config import ConfigError, Section, describe, read_secret

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
        if not self.tls and not self.insecure_plaintext and not _is_loopback(self.host):
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


class IngestConfig(BaseSettings):
    """The whole ingest.toml."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_parse_none_str="null",
        case_sensitive=False,
    )

    mqtt: MqttSection
    ingest: IngestSection
    log: LogSection = LogSection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)  # the environment overrides the file

    def dsn(self) -> str:
        """The connection string, from `dsn` or read from `dsn_file`."""
        if self.ingest.dsn is not None:
            return self.ingest.dsn
        secret = read_secret(self.ingest.dsn_file)
        if not secret:
            raise ConfigError(f"{self.ingest.dsn_file}: ingest.dsn_file is empty")
        return secret


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_path(cli_path: str | os.PathLike[str] | None) -> Path:
    """Where the config is read from: the flag, else the environment, else the default."""
    if cli_path:
        return Path(cli_path)
    env = os.environ.get(ENV_PATH)
    return Path(env) if env else DEFAULT_PATH


def load(path: Path) -> IngestConfig:
    """Read and validate a config file; ConfigError with one line naming file and key."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(raw, str(path))


def parse(raw: bytes, name: str) -> IngestConfig:
    """Validate TOML bytes (plus environment overrides) into the config."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 at byte offset {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: TOML syntax error: {exc}") from None
    try:
        return IngestConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"{name}: {describe(exc)}") from None
