"""Settings are validated once, when read: a bad value is one line naming its variable, never a traceback later."""

from __future__ import annotations

from pathlib import Path

import pytest

from difftpt_ops.config import load_settings, mask_url
from difftpt_ops.core.errors import InputError

pytestmark = pytest.mark.unit

BAD_ENVIRONMENT = [
    ("SHARD_SIZE", "0"), ("SHARD_SIZE", "-4"), ("SHARD_SIZE", "abc"), ("SHARD_SIZE", "2.5"),
    ("SHARD_MAX_ATTEMPTS", "0"), ("HEARTBEAT_INTERVAL_S", "-1"), ("HEARTBEAT_INTERVAL_S", "0"),
    ("STALE_AFTER_S", "-3"), ("VISIBILITY_TIMEOUT_S", "0"), ("MLFLOW_LOG_EVERY", "0"),
    ("SQLITE_BUSY_TIMEOUT_MS", "-1"), ("LOST_MESSAGE_GRACE_S", "0"), ("DEVICE", "gpu"), ("VIEWS_AHEAD", "yes"),
    # Intervals become timers and timestamps: infinite or absurdly long ones crashed a thread later.
    ("HEARTBEAT_INTERVAL_S", "inf"), ("HEARTBEAT_INTERVAL_S", "1e12"), ("STALE_AFTER_S", "inf"),
    ("LOST_MESSAGE_GRACE_S", "Infinity"), ("STALE_AFTER_S", "nan"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ENVIRONMENT)
def test_bad_environment_values_are_refused_naming_the_variable(tmp_path: Path, name: str, value: str) -> None:
    """DIFFTPT_OPS_<NAME>=<value>: one line with the variable and the value."""
    with pytest.raises(InputError) as caught:
        load_settings(tmp_path, env={f"DIFFTPT_OPS_{name}": value})
    message = str(caught.value)
    assert message.startswith(f"DIFFTPT_OPS_{name}={value}: ") and "\n" not in message


def test_bad_toml_values_name_the_file_and_key(tmp_path: Path) -> None:
    """A TOML value is validated like an environment value; the error names the file and the key."""
    (tmp_path / "difftpt-ops.toml").write_text("[difftpt_ops]\nshard_size = 0\n")
    with pytest.raises(InputError, match=r"difftpt-ops.toml:shard_size=0: .*greater than or equal to 1"):
        load_settings(tmp_path, env={})
    (tmp_path / "difftpt-ops.toml").write_text("shard_sise = 3\n")
    with pytest.raises(InputError, match=r"unknown settings \['shard_sise'\]"):
        load_settings(tmp_path, env={})


def test_good_values_are_typed_and_environment_beats_toml(tmp_path: Path) -> None:
    """Numbers arrive as numbers; the environment wins over TOML, TOML over defaults."""
    (tmp_path / "difftpt-ops.toml").write_text("heartbeat_interval_s = 2.5\nshard_size = 16\n")
    settings = load_settings(tmp_path, env={"DIFFTPT_OPS_SHARD_SIZE": "8", "DIFFTPT_OPS_DEVICE": "cuda:1"})
    assert (settings.shard_size, settings.heartbeat_interval_s, settings.device) == (8, 2.5, "cuda:1")
    assert settings.shard_max_attempts == 3 and settings.views_ahead == "auto"
    assert load_settings(tmp_path, env={"DIFFTPT_OPS_VIEWS_AHEAD": "off"}).views_ahead == "off"


def test_mlflow_tracking_uri_is_honoured_when_the_project_variable_is_unset(tmp_path: Path) -> None:
    """DIFFTPT_OPS_MLFLOW_TRACKING_URI, then the TOML file, then MLflow's MLFLOW_TRACKING_URI, then the default."""
    standard = {"MLFLOW_TRACKING_URI": "http://mlflow-host:5000"}
    assert load_settings(tmp_path, env=standard).mlflow_tracking_uri == "http://mlflow-host:5000"
    ours = {**standard, "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none"}
    assert load_settings(tmp_path, env=ours).mlflow_tracking_uri == "none"
    (tmp_path / "difftpt-ops.toml").write_text('mlflow_tracking_uri = "http://from-toml:5000"\n')
    assert load_settings(tmp_path, env=standard).mlflow_tracking_uri == "http://from-toml:5000"
    (tmp_path / "difftpt-ops.toml").unlink()
    assert load_settings(tmp_path, env={}).mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_masking_covers_messages_and_keyword_dsns() -> None:
    """Every URL password in a longer message, and libpq's password=... form, become ***."""
    text = "broker amqp://u:pa55@h:5672// and db postgresql://me:s3cret@db/x failed (host=db password=hunter2)"
    masked = mask_url(text)
    assert "pa55" not in masked and "s3cret" not in masked and "hunter2" not in masked
    assert "amqp://u:***@h:5672//" in masked and "password=***" in masked


def test_the_demo_prints_the_mlflow_command_with_the_password_masked(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's closing lines name the tracking URI (for `mlflow ui`): masked, like every printed URL."""
    from types import SimpleNamespace

    from cli.demo import _print_next_steps

    settings = load_settings(tmp_path, env={"DIFFTPT_OPS_MLFLOW_TRACKING_URI": "postgresql://ml:s3cret-pw@db/mlflow"})
    result = SimpleNamespace(run_ids={"difftpt": 4, "zeroshot": 2, "tpt": 3})
    _print_next_steps(settings, result)
    printed = capsys.readouterr().out
    assert "s3cret-pw" not in printed and "postgresql://ml:***@db/mlflow" in printed



def test_the_demo_says_mlflow_is_off_instead_of_a_command_for_no_store(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With tracking off there is no store to open: no `mlflow ui --backend-store-uri none`."""
    from types import SimpleNamespace

    from cli.demo import _print_next_steps

    settings = load_settings(tmp_path, env={"DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none"})
    _print_next_steps(settings, SimpleNamespace(run_ids={"difftpt": 4, "zeroshot": 2, "tpt": 3}))
    printed = capsys.readouterr().out
    assert "mlflow ui" not in printed and "MLflow is off: DIFFTPT_OPS_MLFLOW_TRACKING_URI=none" in printed
