"""Worker log lines name the run and the shard; Celery's task-id lines are lowered to warnings."""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.unit


def test_shard_lines_name_run_and_shard(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from workers import logs

    monkeypatch.setattr(logs, "_run_of", lambda shard_id: {3: 7}[shard_id])
    with caplog.at_level(logging.INFO, logger="difftpt_ops.worker"):
        logs._shard_started(task_id="0f1e-uuid", args=[3])
        logs._shard_ended(task_id="0f1e-uuid", args=[3], retval="done")
    assert [r.getMessage() for r in caplog.records] == ["run 7 shard 3: started", "run 7 shard 3: done"]
    assert "0f1e" not in caplog.text


def test_worker_start_silences_task_id_lines_and_library_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import logs

    calls: list[str] = []
    monkeypatch.setattr("difftpt_ops.models.quiet.silence_library_progress_bars", lambda: calls.append("bars"))
    logs._quiet_worker()
    assert calls == ["bars"]
    assert all(logging.getLogger(name).level == logging.WARNING for name in logs._CELERY_TASK_LOGGERS)
