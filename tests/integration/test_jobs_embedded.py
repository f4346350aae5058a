"""The job system in-process (embedded executor), on SQLite and PostgreSQL, with the noop method."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from difftpt_ops.core.errors import InputError, ServiceUnavailableError
from difftpt_ops.db.tables import Prediction, Run, Shard
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.running import contexts, embedded, leases, outcomes, processors, runs, shards
from difftpt_ops.services.running.status import list_runs, run_status
from tests.integration.test_jobs_support import (
    add_dataset,
    count,
    distinct_predictions,
    error_rows,
    interrupt_noop_once_at,
    make_settings,
    open_engine,
    read_trace,
    run_state,
    shard_rows,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def reports(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Record the reporting hooks instead of talking to MLflow."""
    calls: dict[str, list[int]] = {"progress": [], "finished": []}
    monkeypatch.setattr(reporting, "report_progress", lambda _e, _s, run_id: calls["progress"].append(run_id))
    monkeypatch.setattr(reporting, "report_finished", lambda _e, _s, run_id: calls["finished"].append(run_id))
    monkeypatch.setattr(reporting, "_next_report", {})
    monkeypatch.setattr(reporting, "PROGRESS_REPORT_INTERVAL_S", 0.0)
    return calls


@pytest.fixture
def env(workspace: Path, database_url: str, reports: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> dict[str, Any]:
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv(processors.NOOP_TRACE_ENV, str(trace))
    settings = make_settings(workspace, database_url)
    engine = open_engine(settings)
    contexts.clear_caches()
    return {"settings": settings, "engine": engine, "trace": trace, "reports": reports}


def _submit(env: dict[str, Any], **kwargs: Any) -> runs.SubmitResult:
    options = {"dataset_ref": "toy", "method": "noop", "shard_size": 16, **kwargs}
    return runs.submit_tune(env["engine"], env["settings"], **options)


def _submit_queued(env: dict[str, Any], n: int) -> tuple[Any, Any, runs.SubmitResult]:
    """A noop run of `n` samples submitted as with a broker: its tickets recorded, its shards queued."""
    from tests.integration.test_jobs_support import RecordingDispatcher

    add_dataset(env["engine"], "toy", n)
    settings = make_settings(env["settings"].workspace, env["settings"].database_url,
                             broker_url="redis://127.0.0.1:1/0")
    dispatcher = RecordingDispatcher()
    result = runs.submit_tune(env["engine"], settings, dataset_ref="toy", method="noop", shard_size=16,
                              dispatcher=dispatcher)
    return settings, dispatcher, result


def test_submit_gives_one_prediction_per_sample(env: dict[str, Any]) -> None:
    """An embedded noop run finishes with exactly one prediction per sample and every shard done."""
    add_dataset(env["engine"], "toy", 100)
    result = _submit(env)
    assert (result.created, result.state, result.shards_total, result.num_samples) == (True, "finished", 7, 100)
    assert count(env["engine"], Prediction, result.run_id) == distinct_predictions(env["engine"], result.run_id) == 100
    assert [(s.state, s.samples_done, s.attempts) for s in shard_rows(env["engine"], result.run_id)][-1] == (
        "done", 4, 1)
    assert sorted(read_trace(env["trace"])) == list(range(100))
    assert env["reports"]["finished"] == [result.run_id] and env["reports"]["progress"]


def test_resubmit_and_limits_do_only_missing_work(env: dict[str, Any]) -> None:
    """The same spec attaches to its run; a larger --limit extends it; nothing finished is redone."""
    add_dataset(env["engine"], "toy", 60)
    first = _submit(env, limit=20)
    assert (first.state, first.num_samples) == ("finished", 20)
    again = _submit(env, limit=10)
    assert (again.run_id, again.created, again.shards_new, again.shards_dispatched) == (first.run_id, False, 0, 0)
    extended = _submit(env, limit=50)
    assert (extended.run_id, extended.shards_new, extended.num_samples, extended.state) == (
        first.run_id, 2, 50, "finished")
    full = _submit(env)
    assert full.num_samples == 60 and count(env["engine"], Prediction, first.run_id) == 60
    assert sorted(read_trace(env["trace"])) == list(range(60))  # each sample processed exactly once
    other_seed = _submit(env, seed=1, limit=5)
    assert other_seed.created and other_seed.run_id != first.run_id


def test_failed_samples_are_recorded_and_the_shard_goes_on(env: dict[str, Any]) -> None:
    """Samples that failed at registration become SampleError rows; the run ends finished_with_failures."""
    add_dataset(env["engine"], "toy", 40, failed=[3, 17])
    result = _submit(env)
    assert result.state == "finished_with_failures"
    errors = error_rows(env["engine"], result.run_id)
    assert sorted(e.sample_index for e in errors) == [3, 17] and "cannot decode" in errors[0].error
    assert count(env["engine"], Prediction, result.run_id) == 38
    assert 3 not in read_trace(env["trace"])  # never fed to the method
    status = run_status(env["engine"], env["settings"], result.run_id)[0]
    assert (status["done"], status["failed"], status["pending"]) == (38, 2, 0)


def test_a_failing_shard_retries_then_fails_and_resume_finishes_it(env: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error retries the shard up to shard_max_attempts, then fails it with its traceback."""
    add_dataset(env["engine"], "toy", 48)
    monkeypatch.setattr(outcomes, "RETRY_BACKOFF_S", 0.0)
    original = processors.NoopProcessor.process

    def broken(self: processors.NoopProcessor, sample: Any) -> Any:
        if sample.index == 20:
            raise RuntimeError("injected failure")
        return original(self, sample)

    monkeypatch.setattr(processors.NoopProcessor, "process", broken)
    result = _submit(env)
    assert result.state == "failed"
    failed = [s for s in shard_rows(env["engine"], result.run_id) if s.state == "failed"]
    assert len(failed) == 1 and failed[0].attempts == 3 and "RuntimeError: injected failure" in failed[0].error
    assert failed[0].samples_done == 0 and count(env["engine"], Prediction, result.run_id) == 32
    status = run_status(env["engine"], env["settings"], result.run_id)[0]
    assert status["failed_shards"][0]["shard"] == failed[0].index
    with env["engine"].connect() as connection:  # the run says why, not only that shards failed
        error = connection.scalar(select(Run.error).where(Run.id == result.run_id))
    assert error.startswith("1 shard(s) failed: RuntimeError: injected failure; `difftpt-ops status")
    monkeypatch.setattr(processors.NoopProcessor, "process", original)
    resumed = runs.resume_run(env["engine"], env["settings"], result.run_id)
    assert resumed.state == "finished" and count(env["engine"], Prediction, result.run_id) == 48


def test_a_shard_whose_setup_fails_is_sent_again_to_its_queue(env: dict[str, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure before the run's context is open (a model that does not load) still names the shard's queue,
    so a worker sends the retry with its backoff instead of losing it."""
    settings, dispatcher, result = _submit_queued(env, 16)

    def no_model(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("weights do not load")

    monkeypatch.setattr(shards, "open_run_context", no_model)
    shard_id = dispatcher.tickets[0].shard_id
    outcome = shards.execute_shard(env["engine"], settings, shard_id, identity=leases.WorkerIdentity("test@host"))
    assert (outcome.outcome, outcome.queue) == ("retry", "tune") and (outcome.retry_in_s or 0) > 0
    assert [s.state for s in shard_rows(env["engine"], result.run_id)] == ["queued"]


def test_ctrl_c_leaves_a_run_that_resume_finishes(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """KeyboardInterrupt keeps finished samples; resume does the rest without redoing them."""
    add_dataset(env["engine"], "toy", 64)
    interrupt_noop_once_at(monkeypatch, 37)
    with pytest.raises(KeyboardInterrupt):
        _submit(env)
    run_id = 1
    assert run_state(env["engine"], run_id) == "running"
    assert count(env["engine"], Prediction, run_id) == 37  # shards 0-1 done, shard 2's first 5 samples flushed
    interrupted = shard_rows(env["engine"], run_id)[2]
    assert (interrupted.state, interrupted.attempts, interrupted.samples_done) == ("pending", 0, 5)
    status = run_status(env["engine"], env["settings"], run_id)[0]
    assert (status["state"], status["stopped"], status["workers"], status["eta_s"]) == ("running", True, [], None)
    assert [(r["run_id"], r["stopped"]) for r in list_runs(env["engine"], env["settings"])] == [(run_id, True)]
    resumed = runs.resume_run(env["engine"], env["settings"], run_id)
    assert resumed.state == "finished" and distinct_predictions(env["engine"], run_id) == 64
    assert sorted(read_trace(env["trace"])) == list(range(64))


def test_an_embedded_run_does_not_read_stopped_between_its_shards(env: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """While the executor goes from one shard to the next (nothing running), its process holds the rest:
    `status` and `runs list` say running, not stopped (once the process is gone they do: the test below)."""
    add_dataset(env["engine"], "toy", 48)
    seen: list[tuple[bool, bool, list[str]]] = []
    execute = embedded.execute_shard

    def look_then_execute(engine: Any, settings: Any, shard_id: int, **kwargs: Any) -> Any:
        states = [s.state for s in shard_rows(engine, 1)]
        seen.append((run_status(engine, settings, 1)[0]["stopped"], list_runs(engine, settings)[0]["stopped"],
                     states))
        return execute(engine, settings, shard_id, **kwargs)

    monkeypatch.setattr(embedded, "execute_shard", look_then_execute)
    assert _submit(env).state == "finished"
    assert seen == [(False, False, ["queued"] * 3), (False, False, ["done", "queued", "queued"]),
                    (False, False, ["done", "done", "queued"])]


def test_ctrl_c_during_a_retry_backoff_leaves_no_shard_queued(env: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard waiting out its retry backoff in the embedded executor was queued for that process only: after
    Ctrl-C it is pending again and the run reads as stopped (not as queued for workers that do not exist)."""
    add_dataset(env["engine"], "toy", 32)
    original = processors.NoopProcessor.process

    def broken(self: processors.NoopProcessor, sample: Any) -> Any:
        if sample.index == 3:
            raise RuntimeError("injected failure")
        return original(self, sample)

    def ctrl_c(_due: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(processors.NoopProcessor, "process", broken)
    monkeypatch.setattr(embedded, "_wait_until", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _submit(env)
    assert [(s.state, s.attempts) for s in shard_rows(env["engine"], 1)] == [("pending", 1), ("done", 1)]
    assert run_status(env["engine"], env["settings"], 1)[0]["stopped"] is True
    monkeypatch.setattr(processors.NoopProcessor, "process", original)
    assert runs.resume_run(env["engine"], env["settings"], 1).state == "finished"
    assert list_runs(env["engine"], env["settings"])[0]["stopped"] is False  # a finished run is not stopped


def test_a_queued_run_is_not_stopped_and_one_whose_send_failed_is(env: dict[str, Any]) -> None:
    """Shards in a broker queue will be picked up: the run is not reported as stopped. When the broker goes
    away between the submit's check and its send, the shards go back to pending and the run reads stopped."""
    settings, _dispatcher, result = _submit_queued(env, 16)
    assert run_status(env["engine"], settings, result.run_id)[0]["stopped"] is False

    class GoneBroker:
        def check(self) -> None:
            return None

        def send(self, _tickets: Any) -> None:
            raise ServiceUnavailableError("broker at redis://127.0.0.1:1/0 cannot be reached")

    with pytest.raises(ServiceUnavailableError, match="run 2 is planned"):
        runs.submit_tune(env["engine"], settings, dataset_ref="toy", method="noop", seed=1, dispatcher=GoneBroker())
    assert [s.state for s in shard_rows(env["engine"], 2)] == ["pending"]
    assert run_status(env["engine"], settings, 2)[0]["stopped"] is True
    assert [(r["run_id"], r["stopped"]) for r in list_runs(env["engine"], settings)] == [(2, True), (1, False)]


def test_a_silent_workers_shard_is_held_until_a_live_workers_check_would_have_taken_it(env: dict[str, Any]) -> None:
    """With a broker, a running shard whose worker stopped heartbeating (paused, or on a host that lost the
    network) is re-queued by the next stale-shard check of any live worker: the run is not stopped during that
    wait, and is once it has passed with the shard still running (no live worker checked)."""
    from datetime import timedelta

    from difftpt_ops.core.clock import utcnow

    settings, dispatcher, result = _submit_queued(env, 16)
    shard_id = dispatcher.tickets[0].shard_id
    assert shards.claim_shard(env["engine"], settings, shard_id, leases.WorkerIdentity("paused@host")) is not None
    stale, check = settings.stale_after_s, leases.stale_check_interval_s(settings.stale_after_s)
    for age, stopped in ((stale / 2, False), (stale + 1, False), (stale + check, False), (stale + check + 30, True)):
        with env["engine"].begin() as connection:
            connection.execute(update(Shard).where(Shard.id == shard_id).values(
                heartbeat_at=utcnow() - timedelta(seconds=age)))
        assert run_status(env["engine"], settings, result.run_id)[0]["stopped"] is stopped, age


def test_an_embedded_queued_shard_is_held_while_its_process_lives(env: dict[str, Any]) -> None:
    """Embedded, a queued shard waits out a retry in the process that queued it: the run is not stopped while
    that process lives, and is once it is gone (killed during the backoff)."""
    add_dataset(env["engine"], "toy", 8)
    result = _submit(env)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for label, stopped in [(leases.WorkerIdentity("embedded@me").label, False),
                           (f"embedded@me ({socket.gethostname()}:{gone.pid})", True), (None, True)]:
        with env["engine"].begin() as connection:
            connection.execute(update(Shard).where(Shard.run_id == result.run_id).values(state="queued", worker=label))
            connection.execute(update(Run).where(Run.id == result.run_id).values(state="running"))
        assert run_status(env["engine"], env["settings"], result.run_id)[0]["stopped"] is stopped, label
        assert list_runs(env["engine"], env["settings"])[0]["stopped"] is stopped, label


def test_a_run_whose_last_shard_just_ended_is_finishing_not_stopped(env: dict[str, Any]) -> None:
    """Between a worker's last shard commit and the run's final state (its MLflow progress report comes in
    between) the run is running with every shard done: `status` must not call it stopped and offer `resume`.
    Long after that, with no finalizer having come, it is stopped (resume finalises it)."""
    from datetime import timedelta

    from difftpt_ops.core.clock import utcnow

    settings, dispatcher, result = _submit_queued(env, 32)
    worker = leases.WorkerIdentity("test@host")
    for ticket in dispatcher.tickets:
        assert shards.execute_shard(env["engine"], settings, ticket.shard_id, identity=worker).outcome == "done"
    with env["engine"].begin() as connection:  # the moment before the finalizer moves the run
        connection.execute(update(Run).where(Run.id == result.run_id).values(state="running", finished_at=None))
    assert run_status(env["engine"], settings, result.run_id)[0]["stopped"] is False
    assert list_runs(env["engine"], settings)[0]["stopped"] is False
    long_ago = utcnow() - timedelta(seconds=settings.stale_after_s * 3)
    with env["engine"].begin() as connection:
        connection.execute(update(Shard).where(Shard.run_id == result.run_id).values(finished_at=long_ago))
    assert run_status(env["engine"], settings, result.run_id)[0]["stopped"] is True
    assert runs.resume_run(env["engine"], settings, result.run_id, dispatcher=dispatcher).state == "finished"


def test_cancel_and_duplicate_deliveries(env: dict[str, Any]) -> None:
    """With a broker, shards are queued; a shard runs once however often it is delivered; cancel stops the rest."""
    settings, dispatcher, result = _submit_queued(env, 48)
    assert dispatcher.checked == 1 and [t.queue for t in dispatcher.tickets] == ["tune"] * 3
    assert {s.state for s in shard_rows(env["engine"], result.run_id)} == {"queued"}
    worker = leases.WorkerIdentity("test@host")
    first = dispatcher.tickets[0].shard_id
    assert shards.execute_shard(env["engine"], settings, first, identity=worker).outcome == "done"
    assert shards.execute_shard(env["engine"], settings, first, identity=worker).outcome == "skipped"
    assert count(env["engine"], Prediction, result.run_id) == 16
    cancelled = runs.cancel_run(env["engine"], settings, result.run_id)
    assert (cancelled["state"], cancelled["shards_cancelled"]) == ("cancelled", 2)
    second = dispatcher.tickets[1].shard_id
    assert shards.execute_shard(env["engine"], settings, second, identity=worker).outcome == "skipped"
    with pytest.raises(InputError, match="RUN=999"):
        runs.cancel_run(env["engine"], settings, 999)
    resumed = runs.resume_run(env["engine"], settings, result.run_id, dispatcher=dispatcher)
    assert (resumed.state, resumed.shards_dispatched) == ("running", 2)
    for ticket in dispatcher.tickets[3:]:
        shards.execute_shard(env["engine"], settings, ticket.shard_id, identity=worker)
    assert run_state(env["engine"], result.run_id) == "finished"
    assert distinct_predictions(env["engine"], result.run_id) == 48


def test_cancel_stops_a_running_shard_at_its_next_batch(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard whose run is cancelled while it runs writes nothing more and reports its ownership lost."""
    from tests.integration.test_jobs_support import RecordingDispatcher

    add_dataset(env["engine"], "toy", 16)
    settings = make_settings(env["settings"].workspace, env["settings"].database_url, broker_url="redis://x:1/0")
    dispatcher = RecordingDispatcher()
    result = runs.submit_tune(env["engine"], settings, dataset_ref="toy", method="noop", dispatcher=dispatcher)
    original = processors.NoopProcessor.process

    def cancel_midway(self: processors.NoopProcessor, sample: Any) -> Any:
        if sample.index == 5:
            runs.cancel_run(env["engine"], settings, result.run_id)
        return original(self, sample)

    monkeypatch.setattr(processors.NoopProcessor, "process", cancel_midway)
    outcome = shards.execute_shard(env["engine"], settings, dispatcher.tickets[0].shard_id,
                                   identity=leases.WorkerIdentity("test@host"))
    assert outcome.outcome == "lost" and count(env["engine"], Prediction, result.run_id) == 0
    assert run_state(env["engine"], result.run_id) == "cancelled"


def test_cancel_then_resume_while_the_old_worker_runs_leaves_it_one_owner(
        env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel and resume a run while a worker is inside a sample: resume gives the shard fresh attempts, so
    the next claim gets the token the cancelled worker still holds. Only the new owner may write; the old
    worker stops at its next batch instead of running the shard a second time beside it."""
    from tests.integration.test_jobs_support import RecordingDispatcher

    add_dataset(env["engine"], "toy", 16)
    settings = make_settings(env["settings"].workspace, env["settings"].database_url, broker_url="redis://x:1/0")
    dispatcher = RecordingDispatcher()
    result = runs.submit_tune(env["engine"], settings, dataset_ref="toy", method="noop", dispatcher=dispatcher)
    shard_id = dispatcher.tickets[0].shard_id
    new_owner = leases.WorkerIdentity("new@host", pid=2**22 + 1)
    original = processors.NoopProcessor.process
    claims: list[Any] = []

    def cancel_resume_midway(self: processors.NoopProcessor, sample: Any) -> Any:
        if sample.index == 5 and not claims:
            runs.cancel_run(env["engine"], settings, result.run_id)
            runs.resume_run(env["engine"], settings, result.run_id, dispatcher=dispatcher)
            claims.append(shards.claim_shard(env["engine"], settings, shard_id, new_owner))
        return original(self, sample)

    monkeypatch.setattr(processors.NoopProcessor, "process", cancel_resume_midway)
    outcome = shards.execute_shard(env["engine"], settings, shard_id, identity=leases.WorkerIdentity("old@host"))
    assert claims[0] is not None and claims[0].token == 1  # the old worker's token too
    assert outcome.outcome == "lost" and count(env["engine"], Prediction, result.run_id) == 0
    row = shard_rows(env["engine"], result.run_id)[0]
    assert (row.state, row.worker, row.samples_done) == ("running", new_owner.label, 0)


def test_stale_and_dead_workers_lose_their_shards(env: dict[str, Any]) -> None:
    """A running shard is re-queued when its heartbeat is stale or its worker process is gone."""
    from tests.integration.test_jobs_support import RecordingDispatcher

    add_dataset(env["engine"], "toy", 32)
    settings = make_settings(env["settings"].workspace, env["settings"].database_url, broker_url="redis://x:1/0",
                             stale_after_s="60", shard_max_attempts="2")
    dispatcher = RecordingDispatcher()
    result = runs.submit_tune(env["engine"], settings, dataset_ref="toy", method="noop", shard_size=16,
                              dispatcher=dispatcher)
    alive = leases.WorkerIdentity("alive@host")
    dead = leases.WorkerIdentity("dead@host", pid=2**22 + 12345)  # above the default pid_max: never a live pid
    ids = [t.shard_id for t in dispatcher.tickets]
    assert shards.claim_shard(env["engine"], settings, ids[0], alive) is not None
    assert shards.claim_shard(env["engine"], settings, ids[1], dead) is not None
    assert shards.claim_shard(env["engine"], settings, ids[0], dead) is None  # fresh heartbeat, live worker
    assert run_status(env["engine"], settings, result.run_id)[0]["workers"] == [
        {"worker": "alive@host", "gpu": None, "shard": 0}]
    dispatcher.tickets.clear()
    from difftpt_ops.services.running.dispatch import requeue_stale_shards

    assert requeue_stale_shards(env["engine"], settings, dispatcher) == 1
    assert [t.shard_id for t in dispatcher.tickets] == [ids[1]]
    assert [s.state for s in shard_rows(env["engine"], result.run_id)] == ["running", "queued"]
    assert shards.claim_shard(env["engine"], settings, ids[1], dead) is not None  # attempt 2 of 2
    assert requeue_stale_shards(env["engine"], settings, dispatcher) == 0  # attempts used up: failed
    assert shard_rows(env["engine"], result.run_id)[1].state == "failed"
    # Its heartbeat is fresh: the error says the worker's process exited, not that it went silent.
    assert f"worker {dead.label} exited; 2 attempts used" == shard_rows(env["engine"], result.run_id)[1].error


def test_a_host_whose_clock_runs_ahead_reads_the_database_clock(postgres_url: str, workspace: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers on several hosts compare heartbeats written by each other. A host whose clock is 10 minutes
    ahead follows the database server's clock once it opens the database, so another worker's fresh heartbeat
    is not stale to it: it neither takes that shard nor re-queues it."""
    from datetime import timedelta

    from difftpt_ops.core import clock
    from difftpt_ops.services.running.dispatch import requeue_stale_shards
    from difftpt_ops.services.workspace import open_database
    from tests.integration.test_jobs_support import RecordingDispatcher

    monkeypatch.setattr(clock, "_offset", clock.offset())  # restored after the test
    settings = make_settings(workspace, postgres_url, broker_url="redis://x:1/0", stale_after_s="60")
    engine = open_engine(settings)
    add_dataset(engine, "toy", 16)
    dispatcher = RecordingDispatcher()
    runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", shard_size=16, dispatcher=dispatcher)
    shard_id = dispatcher.tickets[0].shard_id
    assert shards.claim_shard(engine, settings, shard_id, leases.WorkerIdentity("other@host")) is not None
    ahead, local = timedelta(minutes=10), clock.local_now
    monkeypatch.setattr(clock, "local_now", lambda: local() + ahead)  # this process is now that host
    assert clock.utcnow() - local() > timedelta(minutes=9)  # before it opens the database: its own clock
    open_database(settings)
    assert abs(clock.offset() + ahead) < timedelta(seconds=5)
    assert shards.claim_shard(engine, settings, shard_id, leases.WorkerIdentity("ahead@host")) is None
    dispatcher.tickets.clear()
    assert requeue_stale_shards(engine, settings, dispatcher) == 0 and dispatcher.tickets == []
    engine.dispose()


def test_a_process_holding_shards_follows_a_step_of_its_host_clock(postgres_url: str, workspace: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """NTP steps the host clock 10 minutes after the worker opened the database: the heartbeat thread measures
    the database clock again, so the worker's timestamps stay on the database's clock."""
    from datetime import timedelta

    from difftpt_ops.core import clock
    from tests.integration.test_jobs_support import RecordingDispatcher

    monkeypatch.setattr(clock, "_offset", clock.offset())  # restored after the test
    settings = make_settings(workspace, postgres_url, broker_url="redis://x:1/0")
    engine = open_engine(settings)
    assert abs(clock.offset()) < timedelta(seconds=5)
    add_dataset(engine, "toy", 16)
    dispatcher = RecordingDispatcher()
    runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", shard_size=16, dispatcher=dispatcher)
    claim = shards.claim_shard(engine, settings, dispatcher.tickets[0].shard_id, leases.WorkerIdentity("w@h"))
    assert claim is not None
    step, local = timedelta(minutes=10), clock.local_now
    monkeypatch.setattr(clock, "local_now", lambda: local() + step)
    monkeypatch.setattr(leases, "CLOCK_RESYNC_S", 0.05)
    monkeypatch.setattr(leases.HEARTBEATS, "_clock_due", 0.0)
    lease = leases.Lease(engine, claim.shard_id, claim.token, 0.05, worker=claim.worker)
    leases.HEARTBEATS.hold(lease)
    try:
        deadline = time.monotonic() + 10
        while abs(clock.offset() + step) > timedelta(seconds=5) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        leases.HEARTBEATS.release(lease)
    assert abs(clock.offset() + step) < timedelta(seconds=5)
    assert abs(clock.utcnow() - local()) < timedelta(seconds=5)
    engine.dispose()


def test_periodic_check_finalizes_a_run_whose_last_worker_died(env: dict[str, Any]) -> None:
    """All shards done but the run still running (its finalizer died): the workers' check finishes it."""
    from sqlalchemy import update

    from difftpt_ops.db.session import session_scope
    from difftpt_ops.db.tables import Run
    from difftpt_ops.services.running.dispatch import requeue_stale_shards
    from tests.integration.test_jobs_support import RecordingDispatcher

    add_dataset(env["engine"], "toy", 20, failed=[2])
    result = _submit(env)
    with session_scope(env["engine"]) as session:
        session.execute(update(Run).where(Run.id == result.run_id).values(state="running", finished_at=None))
    assert requeue_stale_shards(env["engine"], env["settings"], RecordingDispatcher()) == 0
    assert run_state(env["engine"], result.run_id) == "finished_with_failures"
    assert env["reports"]["finished"] == [result.run_id, result.run_id]


def test_a_resend_that_fails_frees_its_claim(env: dict[str, Any]) -> None:
    """The lost-message check claims each re-send; when the broker refuses it, the claim is released so the
    next check (this worker's or another's) sends the shard without waiting another grace period."""
    from difftpt_ops.services.running.dispatch import requeue_lost_messages

    _, _, result = _submit_queued(env, 16)
    settings = make_settings(env["settings"].workspace, env["settings"].database_url,
                             broker_url="redis://127.0.0.1:1/0", lost_message_grace_s="0.01")

    class EmptyBroker:
        def __init__(self, fail: bool) -> None:
            self.fail, self.sent = fail, 0

        def check(self) -> None:
            return None

        def enqueued_shard_ids(self) -> set[int]:
            return set()

        def send(self, tickets: Any) -> None:
            if self.fail:
                raise ServiceUnavailableError("broker gone")
            self.sent += len(tickets)

    missing: dict[int, float] = {}
    assert requeue_lost_messages(env["engine"], settings, EmptyBroker(fail=False), missing) == 0
    time.sleep(0.02)
    with pytest.raises(ServiceUnavailableError):
        requeue_lost_messages(env["engine"], settings, EmptyBroker(fail=True), missing)
    assert [s.resent_at for s in shard_rows(env["engine"], result.run_id)] == [None]
    working = EmptyBroker(fail=False)
    assert requeue_lost_messages(env["engine"], settings, working, missing) == 1 and working.sent == 1

