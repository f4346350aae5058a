"""Faults with real worker processes: kill -9 mid-run, a Redis restart, two workers on one SQLite file, SIGTERM
mid-shard (a dead child replaced by the supervisor: see test_worker_e2e). The noop method is slowed down with
DIFFTPT_OPS_NOOP_DELAY_S and leaves a trace of every sample it processes (DIFFTPT_OPS_NOOP_TRACE).
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Prediction
from difftpt_ops.services.running import runs
from tests.integration.test_jobs_support import (
    add_dataset,
    count,
    distinct_predictions,
    kill_worker,
    log_tail,
    make_settings,
    open_engine,
    read_trace,
    redis_db,
    run_state,
    shard_rows,
    start_worker,
    wait_for,
    wait_ready,
    worker_env,
)
from workers.tasks import dispatcher_for

pytestmark = pytest.mark.integration


def _committed(engine, run_id: int) -> set[int]:  # type: ignore[no-untyped-def]
    with session_scope(engine) as session:
        return set(session.scalars(select(Prediction.sample_index).where(Prediction.run_id == run_id)))


def _partly_done(engine, run_id: int) -> bool:  # type: ignore[no-untyped-def]
    return any(s.state == "running" and 0 < s.samples_done < s.stop - s.start for s in shard_rows(engine, run_id))


def _slow_run_partly_done(settings, engine, broker: str, tmp_path: Path, *, samples: int,  # type: ignore[no-untyped-def]
                          shard_size: int):
    """A traced, slowed-down worker running a noop run, returned once a shard has flushed some samples.

    A shard flushes every 2 s (shards.FLUSH_INTERVAL_S) at 0.1 s a sample, so a shard of n samples is seen
    part done for about (n/10 - 2) s: shards of 40 or more leave the poll a window of 2 s or more."""
    add_dataset(engine, "toy", samples)
    env = worker_env(settings, broker, noop_trace=str(tmp_path / "t1"), noop_delay_s="0.1")
    worker = start_worker(env, tmp_path / "w1")
    result = runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", shard_size=shard_size,
                              dispatcher=dispatcher_for(settings))

    def explain() -> str:
        shards = [(s.state, s.samples_done, s.stop - s.start, s.worker) for s in shard_rows(engine, result.run_id)]
        return f"shards (state, done, size, worker): {shards}; {log_tail(tmp_path / 'w1', 40)}"

    wait_for(lambda: _partly_done(engine, result.run_id), timeout=90, what="a shard flushed part of its samples",
             explain=explain)
    return worker, result


def test_kill_9_mid_shard_then_a_new_worker_and_resume(workspace: Path, database_url: str, tmp_path: Path) -> None:
    """Exactly one prediction per sample, and no sample that was committed before the kill is redone."""
    with redis_db() as broker:
        settings = make_settings(workspace, database_url, broker_url=broker, stale_after_s="3")
        engine = open_engine(settings)
        first, result = _slow_run_partly_done(settings, engine, broker, tmp_path, samples=80, shard_size=40)
        kill_worker(first)
        committed = _committed(engine, result.run_id)
        assert 0 < len(committed) < 80
        second = start_worker(worker_env(settings, broker, noop_trace=str(tmp_path / "t2"), noop_delay_s="0.1"),
                              tmp_path / "w2")
        try:
            resumed = runs.resume_run(engine, settings, result.run_id, dispatcher=dispatcher_for(settings))
            assert resumed.shards_dispatched >= 1
            wait_for(lambda: run_state(engine, result.run_id) == "finished", timeout=120, what="the resumed run")
        finally:
            kill_worker(second)  # clean shutdown is tested in test_worker_e2e
    assert count(engine, Prediction, result.run_id) == distinct_predictions(engine, result.run_id) == 80
    redone = read_trace(tmp_path / "t2")
    assert not committed & set(redone), "a sample finished before the kill was processed again"
    assert len(redone) == len(set(redone)) and set(redone) | committed == set(range(80))


def _redis_server(port: int, directory: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    wait_for(lambda: _pings(client), timeout=10, what=f"redis-server on port {port}")
    return process


def _pings(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_redis_restart_mid_run_then_resume(workspace: Path, tmp_path: Path) -> None:
    """A broker restart loses the queued messages; the worker reconnects and resume finishes the run."""
    from tests.integration.test_jobs_support import free_port

    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    server = _redis_server(port, tmp_path)
    settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", broker_url=broker)
    engine = open_engine(settings)
    add_dataset(engine, "toy", 120)
    worker = start_worker(worker_env(settings, broker, noop_delay_s="0.04"), tmp_path / "worker.log")
    try:
        result = runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", shard_size=20,
                                  dispatcher=dispatcher_for(settings))
        wait_for(lambda: any(s.state == "done" for s in shard_rows(engine, result.run_id)), timeout=90,
                 what="a first shard done")
        server.kill()
        server.wait()
        server = _redis_server(port, tmp_path)  # empty: the queued messages are gone
        resumed = runs.resume_run(engine, settings, result.run_id, dispatcher=dispatcher_for(settings))
        assert resumed.shards_dispatched >= 1
        wait_for(lambda: run_state(engine, result.run_id) == "finished", timeout=120, what="the run after resume")
    finally:
        kill_worker(worker)
        server.kill()
        server.wait()
    assert count(engine, Prediction, result.run_id) == distinct_predictions(engine, result.run_id) == 120


def test_two_workers_on_one_sqlite_workspace_lose_no_writes(workspace: Path, tmp_path: Path) -> None:
    """Two worker processes write to one SQLite file at once; every sample is stored once."""
    with redis_db() as broker:
        settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", broker_url=broker)
        engine = open_engine(settings)
        add_dataset(engine, "toy", 240, failed=[7, 100])
        log = tmp_path / "workers.log"
        worker = start_worker(worker_env(settings, broker, noop_delay_s="0.01"), log, "--concurrency-per-gpu", "2")
        try:
            wait_ready(log, 2)
            result = runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", shard_size=12,
                                      dispatcher=dispatcher_for(settings))
            wait_for(lambda: run_state(engine, result.run_id) == "finished_with_failures", timeout=120,
                     what="the run")
        finally:
            kill_worker(worker)
    assert count(engine, Prediction, result.run_id) == distinct_predictions(engine, result.run_id) == 238
    names = {s.worker.split(" ")[0] for s in shard_rows(engine, result.run_id)}
    # (a supervisor running beside this test on the same host, e.g. another test session, adds its pid)
    assert len(names) == 2 and all(re.search(r"-cpu-[01](-\d+)?$", name) for name in names)
    assert sum(s.samples_done for s in shard_rows(engine, result.run_id)) == 238


def test_sigterm_mid_shard_requeues_it_and_exits_0(workspace: Path, tmp_path: Path) -> None:
    """Warm shutdown: the running shard keeps its finished samples, goes back to the queue, and the next
    worker finishes the run without `resume` and without redoing a stored sample."""
    with redis_db() as broker:
        settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", broker_url=broker)
        engine = open_engine(settings)
        first, result = _slow_run_partly_done(settings, engine, broker, tmp_path, samples=80, shard_size=80)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        [shard] = shard_rows(engine, result.run_id)
        assert (shard.state, shard.attempts, shard.worker) == ("queued", 0, None) and shard.samples_done > 0
        stored = _committed(engine, result.run_id)
        second = start_worker(worker_env(settings, broker, noop_trace=str(tmp_path / "t2")), tmp_path / "w2")
        try:
            wait_for(lambda: run_state(engine, result.run_id) == "finished", timeout=90, what="the run")
        finally:
            kill_worker(second)
    assert distinct_predictions(engine, result.run_id) == count(engine, Prediction, result.run_id) == 80
    assert not stored & set(read_trace(tmp_path / "t2"))
