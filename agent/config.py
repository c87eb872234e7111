"""The agent's configuration: TOML validated into pydantic models once, at start (contract section 1).

Path: `--config`, else `$STORE_AGENT_CONFIG`, else `/etc/store-agent/agent.toml`. Any key can be
overridden from the environment as `STORE_AGENT__SECTION__KEY=value` (values that are lists or
tables are given as JSON). Unknown keys, wrong types and missing required keys are errors that
name the key's path.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.presence_config import BleConfig

DEFAULT_PATH = Path("/etc/store-agent/agent.toml")
ENV_PATH = "STORE_AGENT_CONFIG"
ENV_PREFIX = "STORE_AGENT__"


class ConfigError(Exception):
    """A config that cannot be used; its message is one line naming the file and key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(Section):
    tenant: str = Field(min_length=1, pattern=r"^[^/#+\s]+$")
    store: str = Field(min_length=1, pattern=r"^[^/#+\s]+$")
    id: str = Field(default_factory=socket.gethostname, min_length=1, pattern=r"^[^/#+\s]+$")
    data_dir: Path = Path("/var/lib/store-agent")


class MqttSection(Section):
    host: str | None = None  # None: no broker, the agent only buffers
    port: int = Field(default=8883, ge=1, le=65535)
    tls: bool = True
    topic_prefix: str = Field(default="retail", pattern=r"^[^#+]+$")
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    protocol: Literal["3.1.1", "5"] = "5"
    batch_size: int = Field(default=500, ge=1, le=5000)
    batch_max_bytes: int = Field(default=256 * 1024, ge=1024)
    inflight: int = Field(default=16, ge=1, le=1000)
    backoff_max_s: float = Field(default=30.0, gt=0, le=30.0)
    metrics_interval_s: float = Field(default=60.0, gt=0)

    @property
    def is_loopback(self) -> bool:
        """True for a broker on this machine (127.0.0.0/8, ::1, localhost)."""
        if self.host is None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @model_validator(mode="after")
    def _tls_files(self) -> MqttSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate and its key)")
        return self


class BufferSection(Section):
    file: str = "buffer.db"
    max_bytes: int = Field(default=1 << 30, ge=64 * 1024)
    retention_days: float = Field(default=7.0, gt=0)


class PosSection(Section):
    name: str = Field(min_length=1)
    port: str = Field(min_length=1)
    baudrate: int = Field(default=9600, gt=0)
    protocol: Literal["stxetx", "escpos"] = "stxetx"
    forward_to: str | None = None
    encoding: str = "gb18030"
    patterns: dict[str, str] = Field(default_factory=dict)
    ack_timeout_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _escpos_forward(self) -> PosSection:
        if self.protocol == "stxetx" and self.forward_to is not None:
            raise ValueError("forward_to is only for protocol = \"escpos\"")
        return self


class ScannerSection(Section):
    name: str = Field(min_length=1)
    port: str = Field(min_length=1)
    baudrate: int = Field(default=9600, gt=0)
    terminator: Literal["auto", "cr", "lf", "crlf"] = "auto"


class LocalApiSection(Section):
    enabled: bool = True
    listen: str = "127.0.0.1:8750"
    token_file: Path | None = None
    streams: list[str] = Field(default_factory=lambda: ["app"])
    dashboard_password_file: Path | None = None
    max_events: int = Field(default=5000, ge=1)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("listen must be HOST:PORT, e.g. 127.0.0.1:8750")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class LogSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class SimulatorSection(Section):
    """Simulated devices for the demo: a POS that sells on a pty."""

    pos_rate_per_min: float = Field(default=20.0, ge=0)


class AgentConfig(BaseSettings):
    """The whole agent.toml."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_parse_none_str="null",
        case_sensitive=False,
    )

    agent: AgentSection
    mqtt: MqttSection = MqttSection()
    buffer: BufferSection = BufferSection()
    pos: Annotated[list[PosSection], Field(default_factory=list)]
    scanner: Annotated[list[ScannerSection], Field(default_factory=list)]
    ble: BleConfig | None = None
    local_api: LocalApiSection = LocalApiSection()
    log: LogSection = LogSection()
    simulator: SimulatorSection | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # environment first (it overrides), then the TOML handed in as init values
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _unique_names(self) -> AgentConfig:
        for kind, items in (("pos", self.pos), ("scanner", self.scanner)):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind} names must be unique: {', '.join(dupes)}")
        return self

    @property
    def buffer_path(self) -> Path:
        return self.agent.data_dir / self.buffer.file

    @property
    def topic_base(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.agent.tenant}/{self.agent.store}/{self.agent.id}"


def config_path(cli_path: str | os.PathLike[str] | None) -> Path:
    """Where the config is read from: the flag, else the environment, else the default."""
    if cli_path:
        return Path(cli_path)
    env = os.environ.get(ENV_PATH)
    return Path(env) if env else DEFAULT_PATH


def load(path: Path) -> AgentConfig:
    """Read and validate a config file; raise ConfigError with one line naming file and key."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(raw, str(path))


def parse(raw: bytes, name: str) -> AgentConfig:
    """Validate TOML bytes (plus environment overrides) into the config."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 at byte offset {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: TOML syntax error: {exc}") from None
    try:
        return AgentConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"{name}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """The first validation error as `key.path: message` (plus how many more there are)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    where = where or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif "input" in first and first["type"] not in ("value_error",) and not isinstance(first["input"], dict):
        message = f"{message} (got {_short(first['input'])})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_secret(path: Path | None) -> str | None:
    """A secret from a file, without its trailing newline; never logged."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read secret: {exc.strerror}") from None
