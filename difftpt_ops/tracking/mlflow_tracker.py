"""A thin, idempotent layer over MlflowClient: experiments, runs found by tag, batched logging.

Knows nothing about our database; services/reading/reporting.py decides what to log. `mlflow` is imported
lazily (about 2 s) so the CLI stays fast for commands that do not track.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINGERPRINT_TAG = "difftpt.fingerprint"
RUN_ID_TAG = "difftpt.run_id"
SWEEP_TAG = "difftpt.sweep"  # the ids of the sweeps a run belongs to, comma-separated
MAX_PARAM_VALUE = 6000  # MLflow rejects longer parameter values
_BATCH_PARAMS = 100  # MLflow's per-request limits
_BATCH_METRICS = 1000
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
# MLflow logs its store's table creation at INFO on first use; users and worker logs need warnings only.
# Set before any `mlflow` import (MLflow reads it once, at import); an explicit value is kept.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# With a tracking server MLflow writes "View run ... at: URL" to stdout whenever a run ends: noise on the CLI,
# and a WARNING line in worker logs (Celery logs stdout at that level). Runs are named `<method> #N` in the UI.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
# A tracking server that is down must cost seconds, not MLflow's default of 7 retries over minutes:
# the caller marks the run for `mlflow sync` instead. Explicit environment settings still win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@dataclass(frozen=True)
class RunSnapshot:
    """What we need to know of an MLflow run to log to it idempotently."""

    run_id: str
    experiment_id: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def is_remote(tracking_uri: str) -> bool:
    """A tracking server (it decides where artifacts go) rather than a database store we write directly."""
    return tracking_uri.split(":", 1)[0].lower() in {"http", "https", "databricks"}


def param_value(value: Any) -> str:
    """A spec value as an MLflow parameter string (long values are cut, with a marker)."""
    text = "None" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 14] + "...(truncated)"


def metric_key(name: str) -> str:
    return _KEY_UNSAFE.sub("_", name)


def run_group_tags(spec: Mapping[str, Any]) -> dict[str, str]:
    """The tags the UI's compare view groups runs by, besides method and dataset: model and seed.

    (`difftpt.sweep`, the sweeps a run belongs to, is set when a sweep is submitted, and by `mlflow sync`.)
    """
    model = spec.get("model") or {}
    return {"difftpt.model": str(model.get("name", "")), "difftpt.seed": str(spec.get("seed", ""))}


@contextmanager
def _first_use_lock(tracking_uri: str) -> Iterator[bool]:
    """Held while a process first opens a sqlite store (yields True; False for any other URI): MLflow creates or
    migrates the tables of a new file then, and two processes doing it at once (a submit and a worker, two GPU
    workers) collide ("table runs already exists") and can leave the store half-migrated."""
    database = _sqlite_database(tracking_uri)
    if database is None or not database.parent.is_dir():
        yield False
        return
    import fcntl

    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sqlite_database(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database
    return None if not database or database == ":memory:" else Path(database)


class MlflowTracker:
    """One tracking URI. Artifacts of experiments it creates go under `artifact_root` (database stores)."""

    def __init__(self, tracking_uri: str, artifact_root: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            if is_remote(self.tracking_uri):
                for name, value in _HTTP_DEFAULTS.items():
                    os.environ.setdefault(name, value)
            from mlflow import MlflowClient

            with _first_use_lock(self.tracking_uri) as sqlite_store:
                client = MlflowClient(tracking_uri=self.tracking_uri)
                if sqlite_store:
                    client.search_experiments(max_results=1)  # creates or migrates the store's tables
            self._client = client
        return self._client

    def ensure_experiment(self, name: str) -> str:
        """The id of experiment `name`, created (or restored) if needed; safe when two processes race."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            if self.artifact_root is not None and not is_remote(self.tracking_uri):
                location = (Path(self.artifact_root) / "mlflow").resolve().as_uri()
            try:
                return str(self.client.create_experiment(name, artifact_location=location))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)  # another process created it first
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)

    def get_run(self, run_id: str) -> RunSnapshot | None:
        """The run, or None when it does not exist (or was deleted) on this tracking URI."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
                return None
            raise
        if run.info.lifecycle_stage == "deleted":
            return None
        return RunSnapshot(run_id=run.info.run_id, experiment_id=str(run.info.experiment_id),
                           status=run.info.status, params=dict(run.data.params), metrics=dict(run.data.metrics),
                           tags=dict(run.data.tags))

    def find_run(self, experiment_id: str, fingerprint: str) -> RunSnapshot | None:
        """The oldest live run of the experiment tagged with this fingerprint (the id may have been lost)."""
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}'",
            order_by=["attributes.start_time ASC"], max_results=1)
        return self.get_run(runs[0].info.run_id) if runs else None

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(experiment_id, tags=dict(tags), run_name=run_name)
        return str(run.info.run_id)

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def log_params(self, run: RunSnapshot, params: Mapping[str, Any]) -> int:
        """Log the parameters the run does not have yet (params are immutable in MLflow)."""
        from mlflow.entities import Param

        missing = [Param(metric_key(k), param_value(v)) for k, v in params.items() if metric_key(k) not in run.params]
        for start in range(0, len(missing), _BATCH_PARAMS):
            self.client.log_batch(run.run_id, params=missing[start:start + _BATCH_PARAMS])
        return len(missing)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> int:
        """Log (key, value, step) points in batches; returns how many."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_key(k), float(v), now, int(step)) for k, v, step in points]
        for start in range(0, len(metrics), _BATCH_METRICS):
            self.client.log_batch(run_id, metrics=metrics[start:start + _BATCH_METRICS])
        return len(metrics)

    def metric_steps(self, run_id: str, key: str) -> set[int]:
        """Steps already logged for a metric."""
        return {int(m.step) for m in self.client.get_metric_history(run_id, metric_key(key))}

    def set_running(self, run_id: str) -> None:
        """Status back to RUNNING (MLflow does not do it on its own when a run is continued)."""
        self.client.update_run(run_id, status="RUNNING")

    def set_terminated(self, run_id: str, status: str, end_time_ms: int | None = None) -> None:
        self.client.set_terminated(run_id, status=status, end_time=end_time_ms)

    def log_artifacts(self, run_id: str, directory: Path) -> None:
        self.client.log_artifacts(run_id, str(directory))
