"""The Celery app and its configuration (late acks, prefetch 1, JSON only). No tasks, no torch.

`celery -A workers.celery_app worker` builds the app from the environment's settings; a producer
(the CLI submitting work) builds its own with `make_celery(settings)` and sends tasks by name.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from difftpt_ops.config import Settings, install_secret_masking, load_settings

QUEUES = ("generate", "tune")
EXECUTE_SHARD = "difftpt.execute_shard"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for the settings' broker: JSON only, late acks, prefetch 1, no result backend."""
    app = Celery("difftpt_ops", set_as_current=False)
    app.conf.update(
        broker_url=settings.broker_url,
        # JSON only: a message can never carry a pickle (and never an image or a tensor).
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # A task is acknowledged when it returns, and re-delivered if its worker dies meanwhile.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per process: a busy GPU must not hoard shards an idle one could run.
        worker_prefetch_multiplier=1,
        # Results live in the database; nothing is written to a result backend.
        task_ignore_result=True,
        result_backend=None,
        # Redis re-delivers an unacknowledged message after this; it must exceed the longest shard.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="tune",
        task_create_missing_queues=False,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # the database decides, not the channel
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


install_secret_masking()  # worker logs: no URL password, whoever logs it
app = make_celery(load_settings())
app.conf.include = ["workers.tasks", "workers.logs"]  # logs: run and shard ids in worker lines
