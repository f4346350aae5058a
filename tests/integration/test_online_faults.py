"""kill -9 at three random points of one online run, then resume, in-process and with real Redis workers, on
SQLite and PostgreSQL: the result equals an uninterrupted run's (same classes, logits within 1e-6), one row
per sample. And two worker processes never run two links of one chain at once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from difftpt_ops.db.tables import Prediction
from difftpt_ops.services.running import contexts, runs
from tests.integration.test_jobs_support import (
    REPO_ROOT,
    count,
    distinct_predictions,
    kill_worker,
    redis_db,
    run_state,
    shard_rows,
    start_worker,
    wait_for,
    wait_ready,
    worker_env,
)
from tests.integration.test_online_support import assert_same_run, image_dataset, online_settings
from workers.tasks import dispatcher_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAMPLES, SHARD, VIEWS = 24, 4, "16"  # 16 views per sample: slow enough to be killed mid-shard
KILLS = 3


def _submit_args(clip: Path) -> dict[str, object]:
    return {"dataset_ref": "pics", "method": "tda", "model": str(clip), "pretrained": None, "shard_size": SHARD,
            "overrides": {"n_views": VIEWS}}


def _reference(tmp_path: Path, clip: Path):  # type: ignore[no-untyped-def]
    settings, engine = online_settings(tmp_path / "ref", f"sqlite:///{tmp_path / 'ref.db'}")
    image_dataset(engine, tmp_path / "images", n=SAMPLES)
    contexts.clear_caches()
    return engine, settings, runs.submit_tune(engine, settings, **_submit_args(clip)).run_id


def _working_past(engine, run_id: int | None, target: int) -> bool:  # type: ignore[no-untyped-def]
    """At least `target` links are done and the next one is running."""
    if run_id is None:
        return False
    links = shard_rows(engine, run_id)
    return sum(s.state == "done" for s in links) >= target and any(s.state == "running" for s in links)


def _kill_at_random_points(start: Callable[[], Callable[[], None]], engine, run_id: Callable[[], int | None],  # type: ignore[no-untyped-def]
                           rng: random.Random) -> None:
    """Start the executor, wait until a random number of links is done plus a random delay, kill -9 it; 3 times."""
    links = -(-SAMPLES // SHARD)
    targets = sorted(rng.sample(range(links - 1), KILLS))
    for target in targets:
        kill = start()
        wait_for(lambda t=target: _working_past(engine, run_id(), t), timeout=240, what=f"{target} links done",
                 interval=0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        rid = run_id()
        assert rid is not None and run_state(engine, rid) != "finished", f"killed too late (target {target})"
        kill()


_DRIVER = """
import sys
from difftpt_ops.config import load_settings
from difftpt_ops.services.running import runs
from difftpt_ops.services.workspace import open_database
settings = load_settings()
engine = open_database(settings, auto_upgrade=False)
runs.submit_tune(engine, settings, dataset_ref="pics", method="tda", model=sys.argv[1], pretrained=None,
                 shard_size=int(sys.argv[2]), overrides={"n_views": sys.argv[3]})
"""


def test_kill_9_embedded_three_times_then_resume_is_exact(workspace: Path, database_url: str, tmp_path: Path,
                                                          tiny_models_dir: Path) -> None:
    """The submitting process (embedded executor) is killed three times; submitting again resumes the run."""
    clip = tiny_models_dir / "clip"
    ref = _reference(tmp_path, clip)
    settings, engine = online_settings(workspace, database_url)
    image_dataset(engine, tmp_path / "images", n=SAMPLES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")}
    env.update({"DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": database_url,
                "DIFFTPT_OPS_DEVICE": "cpu", "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none",
                "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    log = (tmp_path / "driver.log").open("ab")

    def start() -> Callable[[], None]:
        process = subprocess.Popen([sys.executable, "-c", _DRIVER, str(clip), str(SHARD), VIEWS], env=env,
                                   cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)

        def kill() -> None:
            process.send_signal(signal.SIGKILL)
            process.wait()

        return kill

    def the_run() -> int | None:
        from sqlalchemy import select

        from difftpt_ops.db.session import session_scope
        from difftpt_ops.db.tables import Run

        with session_scope(engine) as session:
            return session.scalar(select(Run.id).where(Run.method == "tda"))

    seed = random.randrange(1 << 30)
    _kill_at_random_points(start, engine, the_run, random.Random(seed))
    contexts.clear_caches()
    final = runs.submit_tune(engine, settings, **_submit_args(clip))
    assert final.state == "finished", f"seed {seed}"
    assert count(engine, Prediction, final.run_id) == distinct_predictions(engine, final.run_id) == SAMPLES
    assert max(s.attempts for s in shard_rows(engine, final.run_id)) >= 2, "no link was interrupted mid-way"
    assert_same_run(engine, settings, final.run_id, *ref)


def test_kill_9_redis_worker_three_times_then_resume_is_exact(workspace: Path, database_url: str, tmp_path: Path,
                                                              tiny_models_dir: Path) -> None:
    """A Celery worker is killed three times mid-run; a new worker and `resume` finish it, exactly."""
    clip = tiny_models_dir / "clip"
    ref = _reference(tmp_path, clip)
    with redis_db() as broker:
        settings, engine = online_settings(workspace, database_url, broker_url=broker, stale_after_s="3")
        image_dataset(engine, tmp_path / "images", n=SAMPLES)
        env = worker_env(settings, broker, device="cpu")
        state: dict[str, int] = {}
        starts = 0

        def start() -> Callable[[], None]:
            nonlocal starts
            starts += 1
            worker = start_worker(env, tmp_path / f"w{starts}.log")
            wait_ready(tmp_path / f"w{starts}.log")
            if "run" not in state:
                state["run"] = runs.submit_tune(engine, settings, dispatcher=dispatcher_for(settings),
                                                **_submit_args(clip)).run_id
            else:
                runs.resume_run(engine, settings, state["run"], dispatcher=dispatcher_for(settings))
            return lambda: kill_worker(worker)

        seed = random.randrange(1 << 30)
        _kill_at_random_points(start, engine, lambda: state.get("run"), random.Random(seed))
        kill = start()
        try:
            wait_for(lambda: run_state(engine, state["run"]) == "finished", timeout=240, what=f"the run (seed {seed})")
        finally:
            kill()
    run_id = state["run"]
    assert count(engine, Prediction, run_id) == distinct_predictions(engine, run_id) == SAMPLES
    assert_same_run(engine, settings, run_id, *ref)


def test_two_worker_processes_never_run_one_chain_at_once(workspace: Path, tmp_path: Path,
                                                          tiny_models_dir: Path) -> None:
    """Every link's message is sent at once to two worker processes: the links still run one after another."""
    with redis_db() as broker:
        settings, engine = online_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", broker_url=broker)
        image_dataset(engine, tmp_path / "images", n=12)
        log = tmp_path / "workers.log"
        worker = start_worker(worker_env(settings, broker, device="cpu"), log, "--concurrency-per-gpu", "2")
        try:
            wait_ready(log, 2)
            result = runs.submit_tune(engine, settings, dispatcher=dispatcher_for(settings),
                                      **{**_submit_args(tiny_models_dir / "clip"), "overrides": {"n_views": "4"}})
            assert result.shards_dispatched == 3
            wait_for(lambda: run_state(engine, result.run_id) == "finished", timeout=180, what="the run")
        finally:
            kill_worker(worker)
    links = shard_rows(engine, result.run_id)
    for earlier, later in zip(links, links[1:], strict=False):
        assert earlier.finished_at <= later.started_at, "two links of one chain overlapped"


def test_a_link_whose_setup_fails_is_sent_again_to_its_queue(workspace: Path, database_url: str, tmp_path: Path,
                                                             tiny_models_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure before the online run's context is open still names the link's queue, so a worker sends the
    retry with its backoff instead of losing it."""
    from difftpt_ops.services.running import online, shards
    from difftpt_ops.services.running.leases import WorkerIdentity
    from tests.integration.test_jobs_support import RecordingDispatcher

    settings, engine = online_settings(workspace, database_url, broker_url="redis://127.0.0.1:1/0")
    image_dataset(engine, tmp_path / "images", n=4)
    dispatcher = RecordingDispatcher()
    result = runs.submit_tune(engine, settings, dispatcher=dispatcher, **_submit_args(tiny_models_dir / "clip"))

    def no_model(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("weights do not load")

    monkeypatch.setattr(online, "_context", no_model)
    first = dispatcher.tickets[0].shard_id
    outcome = shards.execute_shard(engine, settings, first, identity=WorkerIdentity("test@host"))
    assert (outcome.outcome, outcome.queue) == ("retry", "tune") and (outcome.retry_in_s or 0) > 0
    assert shard_rows(engine, result.run_id)[0].state == "queued"
