"""Deployment settings: environment variables (DIFFTPT_OPS_*) over an optional TOML file over defaults.

A pydantic-settings model validates every value once, when the settings are read: a bad value (a shard
size of 0, a negative heartbeat interval, a word where a number belongs) stops the command with one line
naming the variable (or the TOML file and key) and the value, before anything runs.

Experiment settings never live here: they are frozen specs (core/specs.py, method_specs.py, run_specs.py)
stored with each run.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, InitSettingsSource, SettingsConfigDict

from difftpt_ops.core.errors import InputError
from difftpt_ops.core.secrets import install_secret_masking, mask_url

__all__ = ["Settings", "install_secret_masking", "load_settings", "mask_url"]

ENV_PREFIX = "DIFFTPT_OPS_"
DEFAULT_WORKSPACE = "./difftpt-workspace"
CONFIG_FILE_NAME = "difftpt-ops.toml"  # looked up inside the workspace unless DIFFTPT_OPS_CONFIG names one
# MLflow's own variable, honoured when the project's is unset (a box already configured for MLflow).
MLFLOW_STANDARD_ENV = "MLFLOW_TRACKING_URI"
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "sentinel", "memory")  # memory: tests only
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+|mps)$"
VIEWS_AHEAD = ("auto", "on", "off")  # Settings.views_ahead
MAX_INTERVAL_S = 7 * 24 * 3600.0


class Settings(BaseSettings):
    """Effective deployment settings. URLs left unset fall back to the embedded workspace defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True,
                                      extra="forbid", validate_by_name=True)

    workspace: Path = Path(DEFAULT_WORKSPACE)
    database_url: str = Field(min_length=1)
    broker_url: str | None = None  # None: the embedded executor runs work in-process
    # `sql` on PostgreSQL: a user holding SELECT only, instead of SET ROLE to the reader role db upgrade creates
    readonly_database_url: str | None = None
    mlflow_tracking_uri: str = Field(min_length=1)
    artifact_root: Path
    config_file: Path | None = None
    visibility_timeout_s: int = Field(12 * 3600, ge=1)  # must exceed the longest shard
    # Seconds, finite and at most a week: they become timers and timestamps (inf would crash a thread later).
    heartbeat_interval_s: float = Field(15.0, gt=0, le=MAX_INTERVAL_S, allow_inf_nan=False)
    # A running shard whose heartbeat is older is re-queued.
    stale_after_s: float = Field(120.0, gt=0, le=MAX_INTERVAL_S, allow_inf_nan=False)
    # A shard queued in the database but in no broker queue this long (a broker restart lost it) is sent again.
    lost_message_grace_s: float = Field(120.0, gt=0, le=MAX_INTERVAL_S, allow_inf_nan=False)
    shard_size: int = Field(64, ge=1)
    # Online runs: a checkpoint per shard (fsynced file + row) and one shard replayed after a crash; larger
    # shards keep the checkpoints' share of the time small (bench/online.py).
    online_shard_size: int = Field(512, ge=1)
    shard_max_attempts: int = Field(3, ge=1)
    mlflow_log_every: int = Field(100, ge=1)  # running top-1 is logged every N samples, not per sample
    sqlite_busy_timeout_ms: int = Field(60_000, ge=0)
    device: str = "auto"  # auto: cuda when available, else cpu
    # Tuning shards build the next sample's views (files, stored features, crops) in a second thread while the
    # current sample runs: auto does so on CUDA, where the CPU work would otherwise leave the GPU idle.
    views_ahead: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _embedded_defaults(cls, values: Any) -> Any:
        """URLs and paths left unset live in the workspace (known only once the sources are merged)."""
        if not isinstance(values, dict):
            return values
        ws = Path(values.get("workspace") or DEFAULT_WORKSPACE).expanduser().resolve()
        values["workspace"] = ws
        values.setdefault("database_url", f"sqlite:///{ws / 'difftpt.db'}")
        values.setdefault("mlflow_tracking_uri", f"sqlite:///{ws / 'mlflow.db'}")
        values["artifact_root"] = values.get("artifact_root") or ws / "artifacts"
        return values

    @field_validator("broker_url", "readonly_database_url", mode="before")
    @classmethod
    def _empty_broker_is_embedded(cls, value: Any) -> Any:
        return value or None

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str | None) -> str | None:
        if value is not None and value.split("://", 1)[0].lower() not in BROKER_SCHEMES:
            raise ValueError(f"unknown broker scheme; use redis://HOST:6379/0 or amqp://USER@HOST// "
                             f"({', '.join(BROKER_SCHEMES)})")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("views_ahead")
    @classmethod
    def _known_views_ahead(cls, value: str) -> str:
        if value not in VIEWS_AHEAD:
            raise ValueError(f"must be one of {', '.join(VIEWS_AHEAD)}")
        return value

    @field_validator("artifact_root")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def masked(self) -> dict[str, Any]:
        """The settings as plain values, passwords in URLs replaced by ***."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            plain = str(value) if isinstance(value, Path) else value
            out[name] = mask_url(plain) if isinstance(value, str) else plain
        out["embedded"] = self.embedded
        return out


class _MappingEnvSource(EnvSettingsSource):
    """The environment source reading a given mapping (load_settings' `env`) instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], mapping: Mapping[str, str]) -> None:
        self._mapping = dict(mapping)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {key.lower(): value for key, value in self._mapping.items() if value != ""}


_KNOWN = set(Settings.model_fields) - {"config_file"}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise InputError("DIFFTPT_OPS_CONFIG", path, f"cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError("DIFFTPT_OPS_CONFIG", path, f"invalid TOML: {exc}") from exc
    table = data.get("difftpt_ops", data)
    unknown = set(table) - _KNOWN
    if unknown:
        raise InputError("DIFFTPT_OPS_CONFIG", path, f"unknown settings {sorted(unknown)}; "
                                                     f"known: {', '.join(sorted(_KNOWN))}")
    return dict(table)


def _source_of(name: str, env: Mapping[str, str], toml: Mapping[str, Any], config_path: Path) -> tuple[str, Any]:
    """Where the value of setting `name` came from, as the argument an error message names."""
    if env.get(ENV_PREFIX + name.upper()):
        return ENV_PREFIX + name.upper(), env[ENV_PREFIX + name.upper()]
    if name in toml:
        return f"{config_path}:{name}", toml[name]
    if name == "mlflow_tracking_uri" and env.get(MLFLOW_STANDARD_ENV):
        return MLFLOW_STANDARD_ENV, env[MLFLOW_STANDARD_ENV]
    return name, None


def _invalid(exc: ValidationError, env: Mapping[str, str], toml: Mapping[str, Any], config_path: Path) -> InputError:
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else "settings"
    name = name.removeprefix(ENV_PREFIX.lower()).removeprefix(ENV_PREFIX)
    argument, value = _source_of(name.lower(), env, toml, config_path)
    problem = str(error["msg"]).removeprefix("Value error, ")
    shown = error.get("input", value) if value is None else value
    return InputError(argument, mask_url(str(shown)), problem)


def load_settings(workspace: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings. `workspace` (the CLI's --workspace) overrides DIFFTPT_OPS_WORKSPACE.

    Raises:
        InputError: a value that fails validation, an unreadable or unknown TOML file, naming the variable.
    """
    env = dict(os.environ if env is None else env)
    ws = Path(workspace or env.get(ENV_PREFIX + "WORKSPACE") or DEFAULT_WORKSPACE).expanduser().resolve()
    if ws.exists() and not ws.is_dir():
        raise InputError("--workspace" if workspace else ENV_PREFIX + "WORKSPACE", ws, "is a file, not a folder")
    named = env.get(ENV_PREFIX + "CONFIG")
    config_path = Path(named) if named else ws / CONFIG_FILE_NAME
    if named and not config_path.is_file():
        raise InputError("DIFFTPT_OPS_CONFIG", config_path, "file does not exist")
    toml = _read_toml(config_path) if config_path.is_file() else {}
    init = {"workspace": ws, "config_file": config_path if config_path.is_file() else None}
    # MLflow's own variable counts only where neither the project's variable nor its TOML file sets one.
    standard = {"mlflow_tracking_uri": env[MLFLOW_STANDARD_ENV]} if env.get(MLFLOW_STANDARD_ENV) else {}
    # First source wins: --workspace, then the environment, then the TOML file, then MLFLOW_TRACKING_URI,
    # then the defaults.
    sources = (InitSettingsSource(Settings, init), _MappingEnvSource(Settings, env), InitSettingsSource(Settings, toml),
               InitSettingsSource(Settings, standard))
    try:
        return Settings(_build_sources=(sources, {}))
    except ValidationError as exc:
        raise _invalid(exc, env, toml, config_path) from None
