"""A Redis restart loses the queued messages (no persistence): the workers' periodic check sends them again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings
from difftpt_ops.services.running import runs
from difftpt_ops.services.running.dispatch import requeue_lost_messages
from tests.integration.test_hardening_support import PrivateRedis, private_redis
from tests.integration.test_jobs_support import (
    add_dataset,
    make_settings,
    open_engine,
    run_state,
    shard_rows,
    start_worker,
    stop_worker,
    wait_for,
    worker_env,
)
from workers.tasks import dispatcher_for

pytestmark = pytest.mark.integration


def _images(root: Path, n: int) -> list[str]:
    relpaths = [f"class{i % 2}/{i}.png" for i in range(n)]
    for i, relpath in enumerate(relpaths):
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (50 * i % 256, 30, 200 - 20 * i)).save(root / relpath)
    return relpaths


def _submit(engine: Engine, settings: Settings, models: Path, root: Path) -> int:
    """A zero-shot run of 4 images in 2 shards, enqueued on the broker with no worker listening."""
    add_dataset(engine, "pics", 4, root=root, classes=2, relpaths=_images(root, 4))
    result = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=str(models / "clip"),
                              pretrained=None, shard_size=2, dispatcher=dispatcher_for(settings))
    assert result.shards_dispatched == 2
    return result.run_id


def test_queued_shards_lost_by_a_restart_are_sent_again_after_the_grace_period(
        tmp_path: Path, workspace: Path, database_url: str, tiny_models_dir: Path) -> None:
    """Both databases: messages listed, lost by a restart, re-sent once the grace period has passed."""
    with private_redis(tmp_path) as redis:
        settings = make_settings(workspace, database_url, broker_url=redis.url, lost_message_grace_s="1.5")
        engine = open_engine(settings)
        run_id = _submit(engine, settings, tiny_models_dir, tmp_path / "images")
        shard_ids = {shard.id for shard in shard_rows(engine, run_id)}
        dispatcher = dispatcher_for(settings)
        missing: dict[int, float] = {}
        assert dispatcher.enqueued_shard_ids() == shard_ids
        assert requeue_lost_messages(engine, settings, dispatcher, missing) == 0 and missing == {}
        redis.restart()
        assert dispatcher.enqueued_shard_ids() == set()
        assert requeue_lost_messages(engine, settings, dispatcher, missing) == 0  # within the grace period
        assert set(missing) == shard_ids
        time.sleep(1.6)
        assert requeue_lost_messages(engine, settings, dispatcher, missing) == 2
        assert dispatcher.enqueued_shard_ids() == shard_ids and missing == {}
        assert requeue_lost_messages(engine, settings, dispatcher, missing) == 0  # nothing is lost now


class _StaleView:
    """A second worker whose broker listing was taken before the first worker's re-send arrived."""

    def __init__(self) -> None:
        self.sent = 0

    def enqueued_shard_ids(self) -> set[int]:
        return set()

    def check(self) -> None:
        return None

    def send(self, tickets: list[object]) -> None:
        self.sent += len(tickets)


def test_two_workers_checks_send_a_lost_shard_once(tmp_path: Path, workspace: Path, database_url: str,
                                                   tiny_models_dir: Path) -> None:
    """After a restart every worker's check sees the same shards missing: one claims each re-send (once per
    grace period), so a shard gets one new message, not one per worker."""
    with private_redis(tmp_path) as redis:
        settings = make_settings(workspace, database_url, broker_url=redis.url, lost_message_grace_s="1.0")
        engine = open_engine(settings)
        run_id = _submit(engine, settings, tiny_models_dir, tmp_path / "images")
        first, second = dispatcher_for(settings), _StaleView()
        missing_first: dict[int, float] = {}
        missing_second: dict[int, float] = {}
        redis.restart()
        assert requeue_lost_messages(engine, settings, first, missing_first) == 0
        assert requeue_lost_messages(engine, settings, second, missing_second) == 0  # type: ignore[arg-type]
        time.sleep(1.1)
        assert requeue_lost_messages(engine, settings, first, missing_first) == 2
        assert requeue_lost_messages(engine, settings, second, missing_second) == 0  # type: ignore[arg-type]
        assert second.sent == 0 and all(shard.resent_at is not None for shard in shard_rows(engine, run_id))
        time.sleep(1.1)  # a grace period later the claim is free again: a shard lost twice is sent twice
        assert requeue_lost_messages(engine, settings, second, missing_second) == 2  # type: ignore[arg-type]


def test_rabbitmq_is_not_inspected() -> None:
    """Only Redis forgets its queues on a restart; for other brokers the check sends nothing."""
    settings = make_settings(Path("/nonexistent"), "sqlite:///:memory:", broker_url="amqp://guest@127.0.0.1//")
    assert dispatcher_for(settings).enqueued_shard_ids() is None


@pytest.mark.slow
def test_a_worker_finishes_a_run_whose_messages_a_redis_restart_lost(tmp_path: Path, workspace: Path,
                                                                      tiny_models_dir: Path) -> None:
    """Submitted, Redis restarted before any worker took a message: a worker started afterwards finishes the run
    without anyone typing `resume`."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", broker_url=server.url)
        engine = open_engine(settings)
        run_id = _submit(engine, settings, tiny_models_dir, tmp_path / "images")
        server.restart()
        assert dispatcher_for(settings).enqueued_shard_ids() == set()
        log = tmp_path / "worker.log"
        worker = start_worker(worker_env(settings, server.url, LOST_MESSAGE_GRACE_S="2"), log)
        try:
            wait_for(lambda: run_state(engine, run_id) not in {"pending", "running"}, timeout=240,
                     what="the run to end")
        finally:
            stop_worker(worker)
    finally:
        server.stop()
    assert run_state(engine, run_id) == "finished", log.read_text()[-3000:]
    assert "sent 2 queued shard(s) again" in log.read_text()
