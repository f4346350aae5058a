"""Deployment settings: environment variables (DIFFTPT_OPS_*) over an optional TOML file over defaults.

Experiment settings never live here: they are frozen specs (core/specs.py) stored with each run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftpt_ops.core.errors import InputError

ENV_PREFIX = "DIFFTPT_OPS_"
DEFAULT_WORKSPACE = "./difftpt-workspace"
CONFIG_FILE_NAME = "difftpt-ops.toml"  # looked up inside the workspace unless DIFFTPT_OPS_CONFIG names one


@dataclass(frozen=True)
class Settings:
    """Effective deployment settings. URLs left unset fall back to the embedded workspace defaults."""

    workspace: Path
    database_url: str
    broker_url: str | None  # None: the embedded executor runs work in-process
    mlflow_tracking_uri: str
    artifact_root: Path
    config_file: Path | None = None
    visibility_timeout_s: int = 12 * 3600  # must exceed the longest shard (ops-pitfalls 1)
    heartbeat_interval_s: float = 15.0
    stale_after_s: float = 120.0  # a running shard whose heartbeat is older is re-queued by resume
    shard_size: int = 64
    shard_max_attempts: int = 3
    mlflow_log_every: int = 100  # running top-1 is logged every N samples, not per sample
    sqlite_busy_timeout_ms: int = 60_000
    device: str = "auto"  # auto: cuda when available, else cpu

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def masked(self) -> dict[str, Any]:
        """The settings as plain values, passwords in URLs replaced by ***."""
        out: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            out[item.name] = mask_url(str(value)) if isinstance(value, str) else (
                str(value) if isinstance(value, Path) else value)
        out["embedded"] = self.embedded
        return out


_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@]*:)(?P<pw>[^@]*)(?P<tail>@)")


def mask_url(url: str) -> str:
    """Replace the password of `scheme://user:password@host` with ***."""
    return _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***{m['tail']}", url)


_INT_FIELDS = {"visibility_timeout_s", "shard_size", "shard_max_attempts", "mlflow_log_every",
               "sqlite_busy_timeout_ms"}
_FLOAT_FIELDS = {"heartbeat_interval_s", "stale_after_s"}
_KNOWN = {f.name for f in dataclasses.fields(Settings)} - {"config_file"}


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
        raise InputError("DIFFTPT_OPS_CONFIG", path, f"unknown settings {sorted(unknown)}")
    return dict(table)


def _typed(name: str, value: Any, source: str) -> Any:
    try:
        if name in _INT_FIELDS:
            return int(value)
        if name in _FLOAT_FIELDS:
            return float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(source, value, f"must be a number for {name}") from exc
    return value


def _from_env(env: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _KNOWN:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _typed(name, raw, ENV_PREFIX + name.upper())
    return values


def load_settings(workspace: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read the settings. `workspace` (the CLI's --workspace) overrides DIFFTPT_OPS_WORKSPACE."""
    env = dict(os.environ if env is None else env)
    from_env = _from_env(env)
    ws = Path(workspace or from_env.get("workspace") or DEFAULT_WORKSPACE).expanduser().resolve()
    config_path = Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else ws / CONFIG_FILE_NAME
    values: dict[str, Any] = {}
    if config_path.is_file():
        values.update({k: _typed(k, v, str(config_path)) for k, v in _read_toml(config_path).items()})
    elif env.get(ENV_PREFIX + "CONFIG"):
        raise InputError("DIFFTPT_OPS_CONFIG", config_path, "file does not exist")
    values.update(from_env)
    values.pop("workspace", None)
    artifact_root = Path(values.pop("artifact_root", None) or ws / "artifacts").expanduser()
    return Settings(
        workspace=ws,
        database_url=values.pop("database_url", None) or f"sqlite:///{ws / 'difftpt.db'}",
        broker_url=values.pop("broker_url", None) or None,
        mlflow_tracking_uri=values.pop("mlflow_tracking_uri", None) or f"sqlite:///{ws / 'mlflow.db'}",
        artifact_root=artifact_root,
        config_file=config_path if config_path.is_file() else None,
        **values,
    )
