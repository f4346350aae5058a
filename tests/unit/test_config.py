"""Settings: environment over TOML over defaults; passwords masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from difftpt_ops.config import load_settings, mask_url
from difftpt_ops.core.errors import InputError

pytestmark = pytest.mark.unit


def test_embedded_defaults_live_in_the_workspace(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "ws", env={})
    assert settings.database_url == f"sqlite:///{tmp_path / 'ws' / 'difftpt.db'}"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}"
    assert settings.artifact_root == tmp_path / "ws" / "artifacts"
    assert settings.embedded and settings.is_sqlite


def test_environment_overrides_toml(tmp_path: Path) -> None:
    (tmp_path / "difftpt-ops.toml").write_text('shard_size = 16\nbroker_url = "redis://h:6379/0"\n')
    env = {"DIFFTPT_OPS_WORKSPACE": str(tmp_path), "DIFFTPT_OPS_SHARD_SIZE": "8"}
    settings = load_settings(env=env)
    assert settings.shard_size == 8
    assert settings.broker_url == "redis://h:6379/0" and not settings.embedded
    assert settings.config_file == tmp_path / "difftpt-ops.toml"


def test_workspace_option_beats_environment(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "a", env={"DIFFTPT_OPS_WORKSPACE": str(tmp_path / "b")})
    assert settings.workspace == tmp_path / "a"


def test_bad_values_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="DIFFTPT_OPS_SHARD_SIZE"):
        load_settings(tmp_path, env={"DIFFTPT_OPS_SHARD_SIZE": "many"})
    with pytest.raises(InputError, match="DIFFTPT_OPS_CONFIG"):
        load_settings(tmp_path, env={"DIFFTPT_OPS_CONFIG": str(tmp_path / "missing.toml")})


def test_passwords_are_masked() -> None:
    assert mask_url("postgresql://me:s3cret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert mask_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("sqlite:///a/b.db") == "sqlite:///a/b.db"
