"""Faults of the distributed mode found by QA (each test failed before its fix):

- a database outage at the claim must be a TransientError (Celery retries it), not a raw SQLAlchemyError that
  Celery acknowledges as the task's final failure, dropping the shard's message;
- a queued shard whose only message a killed worker held (Redis `unacked`, kept for the 12 h visibility timeout)
  is sent again by the lost-message check;
- a run is marked for MLflow in the commit that finalizes it, so a worker killed during the final report
  leaves something `mlflow sync` repairs;
- a shard whose worker process died (the supervisor restarts it) does not make the run read `stopped` at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, select

from difftpt_ops.core.clock import utcnow
from difftpt_ops.core.errors import TransientError
from difftpt_ops.db.tables import Run
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.running import finalize, runs, shards
from difftpt_ops.services.running.dispatch import requeue_lost_messages
from difftpt_ops.services.running.leases import WorkerIdentity, awaiting_takeover
from tests.integration.test_hardening_redis import _submit
from tests.integration.test_hardening_support import private_redis
from tests.integration.test_jobs_support import add_dataset, make_settings, open_engine
from workers.tasks import dispatcher_for

pytestmark = pytest.mark.integration


def test_a_database_outage_at_the_claim_is_transient_so_celery_retries_it(workspace: Path) -> None:
    """Before: OperationalError escaped `execute_shard` from `is_chained_shard` (before the claim); Celery logged
    "raised unexpected", acknowledged the message, and the shard sat queued with no message (RabbitMQ: for good)."""
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=2"
    settings = make_settings(workspace, url)
    engine = create_engine(url)
    with pytest.raises(TransientError, match="database error"):
        shards.execute_shard(engine, settings, 12345, identity=WorkerIdentity("test"))


_TAKE_AND_DIE = """
import os, sys
from kombu import Connection
with Connection(sys.argv[1]) as connection:
    channel = connection.default_channel
    message = channel.basic_get(sys.argv[2], no_ack=False)
    assert message is not None
    os._exit(0)  # like kill -9: no ack, no restore of the unacked message
"""


def test_a_queued_shard_whose_message_a_killed_worker_held_is_sent_again(
        tmp_path: Path, workspace: Path, tiny_models_dir: Path) -> None:
    """Before: the message stayed in Redis' `unacked` hash (restored only after the 12 h visibility timeout), the
    check counted it as enqueued, and the shard stayed queued with nothing to run it."""
    with private_redis(tmp_path) as redis:
        settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", broker_url=redis.url,
                                 lost_message_grace_s="1.0")
        engine = open_engine(settings)
        _submit(engine, settings, tiny_models_dir, tmp_path / "images")  # 2 queued shards, 2 messages
        dispatcher = dispatcher_for(settings)
        shard_ids = dispatcher.enqueued_shard_ids()
        assert shard_ids is not None and len(shard_ids) == 2
        subprocess.run([sys.executable, "-c", _TAKE_AND_DIE, redis.url, "tune"], check=True, timeout=60,
                       env={**os.environ})
        assert dispatcher.enqueued_shard_ids() == shard_ids  # just delivered: held by its worker for a while
        missing: dict[int, float] = {}
        time.sleep(1.1)  # the grace a delivered message has to be claimed in
        assert requeue_lost_messages(engine, settings, dispatcher, missing) == 0  # first seen missing
        time.sleep(1.1)
        assert requeue_lost_messages(engine, settings, dispatcher, missing) == 1  # sent again
        assert dispatcher.enqueued_shard_ids() == shard_ids


def test_a_finalized_run_stays_marked_for_mlflow_until_its_report_ends(
        workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: finalize committed the final state with the mark unset; a worker killed during report_finished
    (seconds of MLflow calls) left the MLflow run RUNNING forever, which only `mlflow sync --all` repaired."""
    settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}",
                             mlflow_tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    engine = open_engine(settings)
    add_dataset(engine, "toy", 4)
    monkeypatch.setattr(reporting, "report_progress", lambda *args, **kwargs: None)
    monkeypatch.setattr(reporting, "report_finished", lambda *args, **kwargs: None)  # the worker dies here
    result = runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", shard_size=2)
    assert result.state == "finished"
    with engine.connect() as connection:
        assert connection.scalar(select(Run.mlflow_sync_needed).where(Run.id == result.run_id)) is True
    monkeypatch.undo()
    synced = reporting.sync_runs(engine, settings)  # plain `difftpt-ops mlflow sync`
    assert [(r["run_id"], r["synced"]) for r in synced] == [(result.run_id, True)]
    with engine.connect() as connection:
        assert connection.scalar(select(Run.mlflow_sync_needed).where(Run.id == result.run_id)) is False
    assert finalize.finalize_run_if_complete(engine, settings, result.run_id) is None  # once


def test_a_shard_whose_worker_died_a_moment_ago_is_awaiting_takeover() -> None:
    """Before: a killed worker process (the supervisor restarts it in seconds) made its run read `stopped` at once,
    while a merely silent one was given a stale-shard check's grace."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    label = WorkerIdentity("difftpt@test-cpu", pid=dead.pid).label
    now = utcnow()
    fresh = SimpleNamespace(heartbeat_at=now - timedelta(seconds=1), worker=label)
    old = SimpleNamespace(heartbeat_at=now - timedelta(seconds=100), worker=label)
    assert awaiting_takeover([fresh], now=now, stale_after_s=10.0) == 1
    assert awaiting_takeover([old], now=now, stale_after_s=10.0) == 0  # past one check: stopped, resume it


def test_an_online_link_failed_by_the_stale_check_fails_the_rest_of_its_chain(
        tmp_path: Path, workspace: Path, tiny_models_dir: Path) -> None:
    """Before: the stale check failed the link (its worker died `shard_max_attempts` times) but left the later
    links queued; their gate can never open, so each delivery was skipped, the Redis check re-sent them every two
    grace periods for ever, and the run read `running` (not stopped) with nothing able to end it."""
    from difftpt_ops.db.tables import Shard
    from difftpt_ops.services.running.dispatch import requeue_stale_shards
    from tests.integration.test_jobs_support import RecordingDispatcher, run_state, shard_rows
    from tests.integration.test_online_support import image_dataset, online_settings

    settings, engine = online_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}",
                                       broker_url="redis://127.0.0.1:1/0", shard_max_attempts="3")
    image_dataset(engine, tmp_path / "images", n=6)
    result = runs.submit_tune(engine, settings, dataset_ref="pics", method="tda", model=str(tiny_models_dir / "clip"),
                              pretrained=None, shard_size=2, dispatcher=RecordingDispatcher())
    first = shard_rows(engine, result.run_id)[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with engine.begin() as connection:  # its third worker was just killed mid-link
        connection.execute(Shard.__table__.update().where(Shard.__table__.c.id == first.id).values(
            state="running", attempts=3, worker=WorkerIdentity("w", pid=dead.pid).label, heartbeat_at=utcnow()))
    requeue_stale_shards(engine, settings, RecordingDispatcher())  # type: ignore[arg-type]
    assert [shard.state for shard in shard_rows(engine, result.run_id)] == ["failed", "failed", "failed"]
    assert run_state(engine, result.run_id) == "failed"


def test_a_redelivered_done_link_sends_the_next_link_again(
        tmp_path: Path, workspace: Path, tiny_models_dir: Path) -> None:
    """A worker killed after an online link's commit and before sending the next link's message: RabbitMQ has
    no lost-message check, but it redelivers the done link's unacknowledged message; the worker that skips it
    sends the next link again (marked queued, whether the kill left it pending or queued). A link not done, or
    a done link whose successor already runs, sends nothing."""
    from difftpt_ops.db.tables import Shard
    from difftpt_ops.services.running.online import reissue_next_link
    from tests.integration.test_jobs_support import RecordingDispatcher, shard_rows
    from tests.integration.test_online_support import image_dataset, online_settings

    settings, engine = online_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}",
                                       broker_url="redis://127.0.0.1:1/0")
    image_dataset(engine, tmp_path / "images", n=6)
    result = runs.submit_tune(engine, settings, dataset_ref="pics", method="tda", model=str(tiny_models_dir / "clip"),
                              pretrained=None, shard_size=2, dispatcher=RecordingDispatcher())
    first, second, third = shard_rows(engine, result.run_id)
    assert reissue_next_link(engine, first.id) == ()  # not done: nothing to continue

    def set_state(shard_id: int, state: str) -> None:
        with engine.begin() as connection:
            connection.execute(Shard.__table__.update().where(Shard.__table__.c.id == shard_id).values(state=state))

    set_state(first.id, "done")
    set_state(second.id, "pending")  # the kill came before the next link was even marked queued
    [ticket] = reissue_next_link(engine, first.id)
    assert (ticket.shard_id, ticket.queue) == (second.id, "tune")
    assert [s.state for s in shard_rows(engine, result.run_id)] == ["done", "queued", third.state]
    set_state(second.id, "running")
    assert reissue_next_link(engine, first.id) == ()  # its successor runs: no second message


@pytest.mark.unit
def test_the_worker_task_reissues_only_for_a_redelivered_skipped_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Celery task asks for the next link only when the message it skipped was redelivered (its worker died
    before acknowledging it); a plain duplicate delivery sends nothing more."""
    from difftpt_ops.services.running import online
    from difftpt_ops.services.running.outcomes import Outcome, ShardOutcome, ShardTicket
    from workers import tasks

    sent: list[list[ShardTicket]] = []
    monkeypatch.setattr(tasks, "_settings_and_engine", lambda: (SimpleNamespace(), SimpleNamespace()))
    monkeypatch.setattr(shards, "execute_shard", lambda *args, **kwargs: ShardOutcome(7, Outcome.SKIPPED))
    monkeypatch.setattr(online, "reissue_next_link", lambda engine, shard_id: (ShardTicket(shard_id + 1, "tune"),))
    monkeypatch.setattr(tasks.CeleryDispatcher, "send", lambda self, tickets: sent.append(list(tickets)))
    for redelivered in (False, True):
        tasks.execute_shard.push_request(delivery_info={"redelivered": redelivered}, hostname="w@test")
        try:
            assert tasks.execute_shard.run(7) == "skipped"
        finally:
            tasks.execute_shard.pop_request()
    assert sent == [[ShardTicket(8, "tune")]]
