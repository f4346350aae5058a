"""Real `difftpt-ops worker --gpus cpu` subprocesses on Redis: end-to-end runs on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from PIL import Image

from difftpt_ops.db.tables import Prediction
from difftpt_ops.services.running import runs
from tests.integration.test_jobs_support import (
    add_dataset,
    children_of,
    count,
    distinct_predictions,
    error_rows,
    kill_worker,
    make_settings,
    open_engine,
    redis_db,
    run_state,
    shard_rows,
    start_worker,
    stop_worker,
    wait_for,
    wait_ready,
    worker_env,
)
from workers.tasks import dispatcher_for

pytestmark = pytest.mark.integration


def test_worker_runs_a_tune_run_exactly_once_and_survives_a_dead_child(workspace: Path, tmp_path: Path) -> None:
    """A noop run through Redis and a worker: one prediction per sample; resubmitting does nothing; the
    supervisor replaces a child killed with -9 and stops cleanly on SIGTERM. (PostgreSQL: see test_worker_faults.)
    """
    with redis_db() as broker:
        settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", broker_url=broker)
        engine = open_engine(settings)
        add_dataset(engine, "toy", 300)
        log = tmp_path / "worker.log"
        worker = start_worker(worker_env(settings, broker), log)
        try:
            result = runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", shard_size=32,
                                      dispatcher=dispatcher_for(settings))
            assert (result.created, result.shards_dispatched, result.embedded) == (True, 10, False)
            wait_for(lambda: run_state(engine, result.run_id) == "finished", timeout=90, what="the run to finish")
            again = runs.submit_tune(engine, settings, dataset_ref="toy", method="noop",
                                     dispatcher=dispatcher_for(settings))
            assert (again.run_id, again.created, again.shards_dispatched) == (result.run_id, False, 0)
            [child] = children_of(worker.pid)
            os.kill(child, signal.SIGKILL)
            wait_for(lambda: children_of(worker.pid) not in ([], [child]), timeout=30, what="a restarted child")
            wait_ready(log, 2)
        finally:
            code = stop_worker(worker)
    assert code == 0, log.read_text()
    assert "restarting in" in log.read_text() and children_of(worker.pid) == []
    assert count(engine, Prediction, result.run_id) == distinct_predictions(engine, result.run_id) == 300
    shards = shard_rows(engine, result.run_id)
    assert {(s.state, s.attempts, s.gpu) for s in shards} == {("done", 1, "cpu")}
    # (a supervisor running beside this test on the same host, e.g. another test session, adds its pid)
    assert all(re.fullmatch(r"difftpt@.*-cpu(-\d+)?", s.worker.split(" ")[0]) for s in shards)


def _images(root: Path, n: int) -> list[str]:
    relpaths = []
    for i in range(n):
        relpath = f"class{i % 3}/{i}.png"
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), ((i * 40) % 256, (i * 90) % 256, (i * 10) % 256)).save(root / relpath)
        relpaths.append(relpath)
    (root / relpaths[-1]).write_bytes(b"corrupted after registration")
    return relpaths


def test_worker_runs_zeroshot_with_a_tiny_clip(workspace: Path, tmp_path: Path, tiny_models_dir: Path) -> None:
    """The real engine in a worker: tiny CLIP zero-shot, a corrupt image recorded as a sample error."""
    database_url = f"sqlite:///{workspace / 'difftpt.db'}"
    with redis_db() as broker:
        settings = make_settings(workspace, database_url, broker_url=broker)
        engine = open_engine(settings)
        root = tmp_path / "images"
        add_dataset(engine, "pics", 12, root=root, classes=3, relpaths=_images(root, 12))
        log = tmp_path / "worker.log"
        worker = start_worker(worker_env(settings, broker), log)
        try:
            result = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot",
                                      model=str(tiny_models_dir / "clip"), pretrained=None, shard_size=5,
                                      dispatcher=dispatcher_for(settings))
            wait_for(lambda: run_state(engine, result.run_id) not in {"pending", "running"}, timeout=180,
                     what="the zero-shot run to end")
        finally:
            kill_worker(worker)
    assert run_state(engine, result.run_id) == "finished_with_failures", log.read_text()[-3000:]
    assert count(engine, Prediction, result.run_id) == distinct_predictions(engine, result.run_id) == 11
    errors = error_rows(engine, result.run_id)
    assert [e.sample_index for e in errors] == [11] and "cannot decode" in errors[0].error
