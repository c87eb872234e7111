"""The agent's configuration: TOML validated into pydantic models once, at start (contract section 1).

Path: `--config`, else `$STORE_AGENT_CONFIG`, else `/etc/store-agent/agent.toml`. Unknown keys,
wrong types and missing required keys are errors that name the key's path.

Environment overrides reach every key: `STORE_AGENT__SECTION__KEY=value`, and inside a list of
tables by index, `STORE_AGENT__POS__0__PORT=/dev/ttyUSB1` (index = length adds a table). A key
whose type is text takes the value as it is (`null` is None where None is allowed); any other
key takes JSON (`1883`, `true`, `["app"]`). An unknown name is an error, never ignored; every
error about an overridden value names the variable.

Decisions:
- Booleans are strict: `tls = "yes"` is an error, not true.
- `[local_api] streams` admits only names no driver or the agent itself publishes: a `pos`
  stream would let HTTP clients skip the POS dedup, a `system` one forge agent events, and
  `#`, `+` or `/` would make a topic the broker refuses (the uplink would stall on it).
- What goes into a topic (`tenant`, `store`, `id`, streams) holds no control characters.
- Files named by the config (secrets, certificates, the token) and the non-loopback plaintext
  broker are checked by `check_start` before the agent starts anything: `run` and `drain` call
  it, while `status`, `doctor` and a config pushed by the cloud can be read without the files.
- Loopback is judged by the resolved addresses (all of them loopback); a name that does not
  resolve is not loopback.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import ipaddress
import json
import os
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.core.envelope import AGENT_STREAMS
from agent.core.errors import at_byte, key_path, located
from agent.presence_config import BleConfig
from agent.protocols.escpos import EscposError, check_encoding, compile_patterns

DEFAULT_PATH = Path("/etc/store-agent/agent.toml")
ENV_PATH = "STORE_AGENT_CONFIG"
ENV_PREFIX = "STORE_AGENT__"

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(Exception):
    """A config that cannot be used; its message is one line naming the file and key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# One topic level: no MQTT wildcard or separator, no blank or control character (NUL included).
TOPIC_LEVEL = r"^[^/#+\s\x00-\x1f\x7f]+$"
# A stream the local API may admit: one topic level that is also the part before the dot.
STREAM_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class AgentSection(Section):
    tenant: str = Field(min_length=1, pattern=TOPIC_LEVEL)
    store: str = Field(min_length=1, pattern=TOPIC_LEVEL)
    id: str = Field(default_factory=socket.gethostname, min_length=1, pattern=TOPIC_LEVEL)
    data_dir: Path = Path("/var/lib/store-agent")


class MqttSection(Section):
    host: str | None = Field(
        default=None, min_length=1, pattern=r"^[^\s\x00-\x1f\x7f]+$"
    )  # None: only buffer
    port: int = Field(default=8883, ge=1, le=65535)
    tls: StrictBool = True
    # a broker off this machine without TLS must be accepted in so many words (contract section 8)
    insecure_plaintext: StrictBool = False
    topic_prefix: str = Field(default="retail", pattern=r"^[^#+\x00-\x1f\x7f]+$")
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
        """True for no broker, or one whose every resolved address is loopback (resolves the name)."""
        return self.host is None or resolves_to_loopback(self.host, self.port)

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

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        return value

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, value: dict[str, str]) -> dict[str, str]:
        try:
            compile_patterns(value)  # a bad regex is found at load, not at the first receipt
        except EscposError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _escpos_forward(self) -> PosSection:
        if self.protocol == "stxetx" and self.forward_to is not None:
            raise ValueError('forward_to is only for protocol = "escpos"')
        if self.protocol == "escpos":
            try:
                check_encoding(self.encoding)  # the receipt reader needs ASCII-compatible text
            except EscposError as exc:
                raise ValueError(str(exc)) from None
        return self


class ScannerSection(Section):
    name: str = Field(min_length=1)
    port: str = Field(min_length=1)
    baudrate: int = Field(default=9600, gt=0)
    terminator: Literal["auto", "cr", "lf", "crlf"] = "auto"


class LocalApiSection(Section):
    enabled: StrictBool = True
    listen: str = "127.0.0.1:8750"
    token_file: Path | None = None
    streams: list[Annotated[str, Field(pattern=STREAM_NAME)]] = Field(default_factory=lambda: ["app"])
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

    @field_validator("streams")
    @classmethod
    def _not_agent_streams(cls, value: list[str]) -> list[str]:
        taken = [s for s in value if s.lower() in AGENT_STREAMS]
        if taken:
            raise ValueError(
                f"{', '.join(taken)}: streams of the drivers and the agent cannot be admitted "
                "from the local API"
            )
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class LogSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class CommandsSection(Section):
    """`[commands]` (contract section 3): which commands run, which need a signature, and whose."""

    allow: list[str] | None = None  # omitted: every command
    require_signature: list[str] = ["update_config", "update_agent", "erase_subject"]
    rollback_after_s: float = Field(default=60.0, gt=0)
    public_keys: dict[str, str] = Field(default_factory=dict)  # key id -> base64 of the raw Ed25519 key

    @field_validator("public_keys")
    @classmethod
    def _raw_ed25519(cls, value: dict[str, str]) -> dict[str, str]:
        for key_id, text in value.items():
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{key_id}: not base64") from None
            if len(raw) != 32:
                raise ValueError(f"{key_id}: an Ed25519 public key is 32 raw bytes, this is {len(raw)}")
        return value


class SimulatorSection(Section):
    """Simulated devices for the demo: a POS that sells on a pty."""

    pos_rate_per_min: float = Field(default=20.0, ge=0)


class AgentConfig(BaseModel):
    """The whole agent.toml (environment overrides are applied by `parse`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agent: AgentSection
    mqtt: MqttSection = MqttSection()
    buffer: BufferSection = BufferSection()
    pos: Annotated[list[PosSection], Field(default_factory=list)]
    scanner: Annotated[list[ScannerSection], Field(default_factory=list)]
    ble: BleConfig | None = None
    local_api: LocalApiSection = LocalApiSection()
    log: LogSection = LogSection()
    commands: CommandsSection = CommandsSection()
    simulator: SimulatorSection | None = None

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


def config_path(
    cli_path: str | os.PathLike[str] | None, *, env_path: str = ENV_PATH, default: Path = DEFAULT_PATH
) -> Path:
    """Where the config is read from: the flag, else the variable `env_path`, else `default`."""
    if cli_path:
        return Path(cli_path)
    env = os.environ.get(env_path)
    return Path(env) if env else default


def load(path: Path) -> AgentConfig:
    """Read and validate the agent's config file; raise ConfigError with one line naming file and key."""
    return load_config(AgentConfig, path)


def parse(raw: bytes, name: str, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Validate TOML bytes, plus the environment's overrides (`os.environ` by default), into the config."""
    return parse_config(AgentConfig, raw, name, environ)


def load_config(model: type[ModelT], path: Path, *, prefix: str = ENV_PREFIX) -> ModelT:
    """Read and validate a config file into `model`, the environment's `prefix…` variables applied.

    The one loader of the agent and the fleet ingest (`STORE_AGENT_INGEST__`): ConfigError with
    one line naming the file and the key.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(model, raw, str(path), prefix=prefix)


def parse_config(
    model: type[ModelT],
    raw: bytes,
    name: str,
    environ: Mapping[str, str] | None = None,
    *,
    prefix: str = ENV_PREFIX,
) -> ModelT:
    """Validate TOML bytes, plus the environment's `prefix…` overrides (`os.environ` by default), into `model`."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 {at_byte(exc.start)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: TOML syntax error: {exc}") from None
    try:
        overridden = apply_env(data, os.environ if environ is None else environ, model=model, prefix=prefix)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    try:
        return model(**data)
    except ValidationError as exc:
        raise ConfigError(f"{name}: {describe(exc, overridden)}") from None


def describe(exc: ValidationError, overridden: Mapping[tuple[str | int, ...], str] | None = None) -> str:
    """The first validation error as `key.path: message` (plus how many more there are).

    When the key (or the table holding it) was set from the environment, the variable is named
    first: `STORE_AGENT__MQTT__PORT (mqtt.port): ...`.
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    where = key_path(loc)
    variable = _variable_for(loc, overridden or {})
    if variable is not None:
        where = f"{variable} ({where})"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif "input" in first and first["type"] not in ("value_error",) and not isinstance(first["input"], dict):
        message = f"{message} (got {_short(first['input'])})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return located(where, message) + more


def _variable_for(loc: tuple[str | int, ...], overridden: Mapping[tuple[str | int, ...], str]) -> str | None:
    # the longest overridden key that holds the failing one
    best: tuple[str | int, ...] | None = None
    for key in overridden:
        if loc[: len(key)] == key and (best is None or len(key) > len(best)):
            best = key
    return None if best is None else overridden[best]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- environment overrides ----------------------------------------------------------------------


def apply_env(
    data: dict[str, Any],
    environ: Mapping[str, str],
    *,
    model: type[BaseModel] = AgentConfig,
    prefix: str = ENV_PREFIX,
) -> dict[tuple[str | int, ...], str]:
    """Write every `prefix…` variable (`STORE_AGENT__…`) into `data`, the parsed TOML of a `model`;
    {key path: variable}.

    Raises ConfigError naming the variable for a name that is no key, an index past the end of
    a list, or a value that is not JSON where JSON is needed.
    """
    found: list[tuple[tuple[str | int, ...], str, str]] = []
    for variable, value in environ.items():
        if not variable.upper().startswith(prefix):
            continue
        parts = variable[len(prefix) :].split("__")
        if not all(parts):
            raise ConfigError(f"{variable}: empty key in the name (keys are joined by '__')")
        loc = tuple(int(p) if p.isascii() and p.isdigit() else p.lower() for p in parts)
        found.append((loc, variable, value))
    # a table before its keys, list items in index order, whatever order the environment has
    found.sort(
        key=lambda item: [
            (isinstance(p, str), p if isinstance(p, str) else "", p if isinstance(p, int) else 0)
            for p in item[0]
        ]
    )
    overridden: dict[tuple[str | int, ...], str] = {}
    for loc, variable, value in found:
        _set_key(data, loc, variable, value, model)
        overridden[loc] = variable
    return overridden


def _set_key(
    data: dict[str, Any], loc: tuple[str | int, ...], variable: str, raw: str, model: type[BaseModel]
) -> None:
    node: Any = data
    annotation: Any = model
    for depth, key in enumerate(loc):
        here = key_path(loc[: depth + 1])
        annotation = _child(annotation, key)
        if annotation is None:
            raise ConfigError(located(variable, f"{here} is not a key of the config"))
        last = depth == len(loc) - 1
        if isinstance(key, int):
            if not isinstance(node, list) or key > len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(
                    located(variable, f"{here}: index past the end (the list has {size} items)")
                )
            if key == len(node):
                node.append({})
        elif not isinstance(node, dict):
            raise ConfigError(located(variable, f"{key_path(loc[:depth])} is not a table"))
        if last:
            node[key] = _env_value(annotation, raw, variable, here)
            return
        child = node[key] if (isinstance(key, int) or key in node) else None
        if child is None:
            child = [] if _is_list(annotation) else {}
            node[key] = child
        node = child


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without Annotated and None, whether None is allowed)."""
    nullable = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(annotation))
            if len(args) != 1:
                return annotation, nullable
            annotation = args[0]
        else:
            return annotation, nullable


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(_unwrap(annotation)[0]) is list


def _child(annotation: Any, key: str | int) -> Any:
    """The annotation of `key` inside a value of `annotation`, or None when there is no such key."""
    inner, _ = _unwrap(annotation)
    origin = typing.get_origin(inner)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        field = inner.model_fields.get(key) if isinstance(key, str) else None
        return None if field is None else field.annotation
    if origin is list:
        return typing.get_args(inner)[0] if isinstance(key, int) else None
    if origin is dict:
        return typing.get_args(inner)[1] if isinstance(key, str) else None
    return None


def _env_value(annotation: Any, raw: str, variable: str, where: str) -> Any:
    inner, nullable = _unwrap(annotation)
    if nullable and raw == "null":
        return None
    literal_text = typing.get_origin(inner) is Literal and all(
        isinstance(a, str) for a in typing.get_args(inner)
    )
    if inner in (str, Path) or literal_text:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        if inner in (int, float):
            return raw  # validation says what is wrong with it, naming the variable
        kind = {bool: "true or false", list: 'a JSON list, e.g. ["app"]'}.get(
            inner if isinstance(inner, type) else typing.get_origin(inner), "JSON"
        )
        raise ConfigError(located(variable, f"{where} takes {kind} (got {_short(raw)})")) from None


# ---- checks before the agent starts -------------------------------------------------------------


def resolves_to_loopback(host: str, port: int = 0) -> bool:
    """True when every address `host` resolves to is loopback; False when it does not resolve."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def check_start(cfg: AgentConfig) -> None:
    """What must hold before the agent starts anything; ConfigError (one line, the key) if not.

    The data directory is a directory; every file the config names can be read; a broker off
    this machine is reached over TLS unless `insecure_plaintext = true` says otherwise.
    """
    data_dir = cfg.agent.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(located("agent.data_dir", f"{data_dir} is not a directory"))
    for key, path in config_files(cfg):
        readable_file(key, path)
    m = cfg.mqtt
    if m.host is not None and not m.tls and not m.insecure_plaintext and not m.is_loopback:
        raise ConfigError(
            located(
                "mqtt.tls",
                f"the broker {m.host} is not on loopback and tls = false: the password and every "
                "event would cross the network in plaintext (set tls = true, or [mqtt] insecure_plaintext = true)",
            )
        )


def config_files(cfg: AgentConfig) -> list[tuple[str, Path]]:
    """(key, path) of every file the running agent will read."""
    files: list[tuple[str, Path | None]] = [
        ("mqtt.password_file", cfg.mqtt.password_file),
        ("mqtt.ca_file", cfg.mqtt.ca_file),
        ("mqtt.cert_file", cfg.mqtt.cert_file),
        ("mqtt.key_file", cfg.mqtt.key_file),
    ]
    if cfg.local_api.enabled:
        files += [
            ("local_api.token_file", cfg.local_api.token_file),
            ("local_api.dashboard_password_file", cfg.local_api.dashboard_password_file),
        ]
    return [(key, path) for key, path in files if path is not None]


def readable_file(key: str, path: Path) -> None:
    """ConfigError `key: path: reason` unless `path` is a file this process can open for reading."""
    try:
        with open(path, "rb"):
            pass
    except IsADirectoryError:
        raise ConfigError(located(key, f"{path} is a directory, not a file")) from None
    except OSError as exc:
        raise ConfigError(located(key, f"{path}: {exc.strerror or exc}")) from None


def read_secret(path: Path | None) -> str | None:
    """A secret from a file, without its trailing newline; never logged."""
    if path is None:
        return None
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read secret: {exc.strerror}") from None
    from agent.logsetup import redact  # a secret never reaches a log line, the in-memory ring included

    redact(secret)
    return secret
