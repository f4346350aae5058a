"""Celery tasks (thin: a shard id in, the service does the work) and the Celery dispatcher.

Each worker process also runs a light thread that re-queues shards whose worker stopped
heartbeating (`requeue_stale_shards`): recovery never waits for the broker's visibility timeout.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from amqp.exceptions import AMQPError
from celery import Celery, signals
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from difftpt_ops.config import Settings, load_settings, mask_url
from difftpt_ops.core.errors import ServiceUnavailableError, TransientError
from workers.celery_app import EXECUTE_SHARD, QUEUES, app, make_celery

log = logging.getLogger(__name__)

BROKER_CHECK_TIMEOUT_S = 3.0  # submit fails within about this long when the broker is down
# amqp's errors (a refused login, ACCESS_REFUSED) and redis-py's (a wrong password) are not kombu's.
_BROKER_ERRORS = (KombuError, OSError, ConnectionError, TimeoutError, AMQPError, RedisError)


class CeleryDispatcher:
    """Sends shard tickets as `execute_shard` messages to their queue (implements services' Dispatcher)."""

    def __init__(self, celery: Celery, *, unacked_grace_s: float | None = None) -> None:
        self.app = celery
        # How long a delivered, unacknowledged message of a *queued* shard counts as held (after its eta, for a
        # retry's countdown): a worker killed between receiving it and claiming the shard (or while holding a
        # retry's countdown) leaves it in Redis' `unacked` hash until the visibility timeout (12 h). None: always.
        self.unacked_grace_s = unacked_grace_s

    def _unavailable(self, exc: BaseException) -> ServiceUnavailableError:
        url = mask_url(str(self.app.conf.broker_url))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        if "ACCESS_REFUSED" in reason or "AuthenticationError" in type(exc).__name__ or "WRONGPASS" in reason:
            return ServiceUnavailableError(f"broker {url} refused the login ({reason}); check the user and password "
                                           "in DIFFTPT_OPS_BROKER_URL")
        return ServiceUnavailableError(f"broker {url} is unreachable ({reason}); start it or check "
                                       "DIFFTPT_OPS_BROKER_URL")

    def check(self) -> None:
        """Connect once, with a short timeout: an unreachable broker is reported, never waited for."""
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                             timeout=BROKER_CHECK_TIMEOUT_S)
        except _BROKER_ERRORS as exc:
            raise self._unavailable(exc) from exc

    def send(self, tickets: Sequence[Any]) -> None:
        """Publish one message per ticket over one connection."""
        policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
        try:
            with self.app.producer_or_acquire() as producer:
                for ticket in tickets:
                    self.app.send_task(EXECUTE_SHARD, args=[ticket.shard_id], queue=ticket.queue,
                                       countdown=ticket.countdown or None, producer=producer,
                                       retry=True, retry_policy=policy)
        except _BROKER_ERRORS as exc:
            raise self._unavailable(exc) from exc


    def enqueued_shard_ids(self) -> set[int] | None:
        """Shard ids whose message Redis holds: in a queue, or delivered and not yet acknowledged (`unacked`).

        None for other brokers (RabbitMQ's durable queues survive a restart) or when Redis cannot be read.
        """
        url = str(self.app.conf.broker_url or "")
        if not url.startswith(("redis://", "rediss://")):
            return None
        import redis

        # kombu's Redis transport: a list per queue (and per priority step), and the `unacked` hash.
        steps = ("", *(f"\x06\x16{priority}" for priority in range(1, 10)))
        queue_keys = [f"{queue}{step}" for queue in QUEUES for step in steps]
        try:
            client = redis.Redis.from_url(url, socket_timeout=BROKER_CHECK_TIMEOUT_S)
            raw = [m for key in queue_keys for m in client.lrange(key, 0, -1)]
            delivered_at = {_text(tag): score for tag, score in client.zrange("unacked_index", 0, -1, withscores=True)}
            now = time.time()
            for tag, value in client.hgetall("unacked").items():
                message = json.loads(value)[0]
                if self.unacked_grace_s is None or now < _held_until(message, delivered_at.get(_text(tag), now)) \
                        + self.unacked_grace_s:
                    raw.append(json.dumps(message))
        except (redis.RedisError, ValueError, IndexError, TypeError) as exc:
            log.warning("could not list the broker's messages: %s", exc)
            return None
        return {shard for shard in map(_shard_of_message, raw) if shard is not None}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _held_until(message: dict[str, Any], delivered_at: float) -> float:
    """When a delivered message should have been claimed by: its delivery, or its eta (a retry's countdown)."""
    eta = (message.get("headers") or {}).get("eta")
    if not eta:
        return delivered_at
    try:
        return max(delivered_at, datetime.fromisoformat(eta).timestamp())
    except (TypeError, ValueError):
        return delivered_at


def _shard_of_message(raw: bytes | str) -> int | None:
    """The shard id an `execute_shard` message carries, or None for anything else."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != EXECUTE_SHARD:
            return None
        args = json.loads(base64.b64decode(message["body"]))[0]
        return int(args[0])
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        return None


def dispatcher_for(settings: Settings) -> CeleryDispatcher:
    """A dispatcher for the settings' broker (the CLI's settings may differ from the environment's)."""
    return CeleryDispatcher(make_celery(settings), unacked_grace_s=settings.lost_message_grace_s)


_runtime: dict[str, Any] = {}
_runtime_lock = threading.Lock()


def _settings_and_engine() -> tuple[Settings, Any]:
    """Settings and database engine of this worker process, opened on first use (never migrates)."""
    with _runtime_lock:
        if not _runtime:
            from difftpt_ops.services.workspace import open_database

            settings = load_settings()
            _runtime["engine"] = open_database(settings, auto_upgrade=False)
            _runtime["settings"] = settings
    return _runtime["settings"], _runtime["engine"]


def worker_gpu() -> str | None:
    """The GPU this process was given by the launcher: an index, "cpu", or None when not launched by it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    return visible or "cpu"


@app.task(name=EXECUTE_SHARD, bind=True, acks_late=True, ignore_result=True,
          autoretry_for=(TransientError, ServiceUnavailableError), retry_backoff=5, retry_backoff_max=300,
          retry_jitter=True, max_retries=None)
def execute_shard(self: Any, shard_id: int) -> str:
    """Run one shard; a shard to retry (or interrupted by shutdown) is sent again."""
    from difftpt_ops.services.running.leases import WorkerIdentity
    from difftpt_ops.services.running.outcomes import Outcome, ShardTicket
    from difftpt_ops.services.running.shards import execute_shard as run_shard

    settings, engine = _settings_and_engine()
    identity = WorkerIdentity(name=self.request.hostname or f"celery@{socket.gethostname()}", gpu=worker_gpu())
    outcome = run_shard(engine, settings, int(shard_id), identity=identity)
    if outcome.outcome is Outcome.SKIPPED and (self.request.delivery_info or {}).get("redelivered"):
        # Its last worker died before acknowledging it: perhaps after an online link's commit and before
        # sending the next link's message, which then exists nowhere.
        from difftpt_ops.services.running.online import reissue_next_link

        outcome = dataclasses.replace(outcome, follow_up=reissue_next_link(engine, int(shard_id)))
    if outcome.outcome in (Outcome.RETRY, Outcome.INTERRUPTED) and outcome.queue:
        CeleryDispatcher(self.app).send([ShardTicket(int(shard_id), outcome.queue, outcome.retry_in_s or 0.0)])
    if outcome.follow_up:  # tune shards this generation shard made claimable, an online chain's next link
        CeleryDispatcher(self.app).send(list(outcome.follow_up))
    return outcome.outcome.value


class _StaleShardCheck(threading.Thread):
    """Every few seconds, re-queue running shards whose worker is silent or dead, and send again the queued
    shards whose message the broker lost."""

    def __init__(self) -> None:
        super().__init__(name="stale-shard-check", daemon=True)
        self.stopped = threading.Event()

    def run(self) -> None:
        from difftpt_ops.services.running.dispatch import requeue_lost_messages, requeue_stale_shards
        from difftpt_ops.services.running.leases import resync_clock, stale_check_interval_s

        interval = 30.0
        missing_since: dict[int, float] = {}  # queued shards the broker did not hold at the last look
        while True:
            try:
                settings, engine = _settings_and_engine()
                interval = stale_check_interval_s(settings.stale_after_s)
                resync_clock(engine)  # judge staleness on the database's clock as it is now
                requeued = requeue_stale_shards(engine, settings, CeleryDispatcher(app))
                if requeued:
                    log.warning("re-queued %d shard(s) whose worker stopped heartbeating or exited", requeued)
                resent = requeue_lost_messages(engine, settings,
                                               CeleryDispatcher(app, unacked_grace_s=settings.lost_message_grace_s),
                                               missing_since)
                if resent:
                    log.warning("sent %d queued shard(s) again: the broker had lost their messages (a restart?)",
                                resent)
            except Exception as exc:  # noqa: BLE001 - a failed check is retried at the next tick
                log.warning("stale shard check failed: %s", exc)
            if self.stopped.wait(interval):
                return


_stale_check = _StaleShardCheck()


@signals.worker_init.connect
def _require_broker(sender: Any = None, **_: Any) -> None:
    if not app.conf.broker_url:
        raise SystemExit("DIFFTPT_OPS_BROKER_URL is not set: a worker needs a broker (redis://... or amqp://...)")


@signals.worker_ready.connect
def _start_stale_check(**_: Any) -> None:
    if not _stale_check.is_alive():
        _stale_check.start()


@signals.worker_shutting_down.connect
def _stop_shards(**_: Any) -> None:
    """Warm shutdown: the running shard stores its finished samples, is re-queued, and the task returns."""
    outcomes = sys.modules.get("difftpt_ops.services.running.outcomes")  # not imported: no shard has run here
    if outcomes is not None:
        outcomes.request_stop()
    _stale_check.stopped.set()
