"""Helpers shared by the job-system tests (no tests here): datasets written as rows, settings, a recording
dispatcher, a claimed Redis database, and `difftpt-ops worker` subprocesses.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings, load_settings
from difftpt_ops.data.images import hash_file
from difftpt_ops.db.session import session_scope, upgrade
from difftpt_ops.db.tables import Dataset, DatasetVersion, Prediction, Run, Sample, Shard
from difftpt_ops.db.tables import SampleError as SampleErrorRow
from difftpt_ops.db.writes import insert_ignore
from difftpt_ops.services.workspace import open_database
from tests.conftest import REDIS_URL

REPO_ROOT = Path(__file__).resolve().parents[2]
# Tracking is not under test here: the tracking URI `none` turns the MLflow hooks off in the workers.
QUIET_MLFLOW = {"DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none"}


def make_settings(workspace: Path, database_url: str, **extra: str) -> Settings:
    """Settings for a test: its workspace and database, plus DIFFTPT_OPS_* overrides (without the prefix)."""
    env = {"DIFFTPT_OPS_DATABASE_URL": database_url, **{f"DIFFTPT_OPS_{k.upper()}": v for k, v in extra.items()}}
    return load_settings(workspace, env=env)


def open_engine(settings: Settings) -> Engine:
    """The test database at the current schema (PostgreSQL is migrated explicitly, as in production)."""
    engine = open_database(settings, auto_upgrade=True)
    upgrade(engine)
    return engine


def write_pictures(root: Path, n: int, *, seed: int, size: tuple[int, int]) -> list[str]:
    """`n` random PNGs under `root` in two ImageFolder classes (class<i % 2>/<i>.png, image i drawn from seed + i);
    their relative paths, for add_dataset's `relpaths`."""
    from tests.unit.tta_support import random_image  # torch: only the tests that write images pay for it

    relpaths = []
    for i in range(n):
        relpath = f"class{i % 2}/{i}.png"
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        random_image(seed + i, size).save(root / relpath)
        relpaths.append(relpath)
    return relpaths


def add_dataset(engine: Engine, name: str, n: int, *, failed: Sequence[int] = (), root: Path | None = None,
                classes: int = 5, relpaths: Sequence[str] | None = None) -> int:
    """A registered dataset written directly as rows (no files needed for noop); returns its version id."""
    with session_scope(engine) as session:
        dataset = Dataset(name=name, format="imagefolder", root=str(root or "/nonexistent"),
                          class_names=[f"class{i}" for i in range(classes)])
        session.add(dataset)
        session.flush()
        version = DatasetVersion(dataset_id=dataset.id, version=1, num_samples=n, num_failed=len(failed),
                                 fingerprint=hashlib.sha256(f"{name}:{n}".encode()).hexdigest())
        session.add(version)
        session.flush()
        rows = [{"dataset_version_id": version.id, "index": i, "label": i % classes,
                 "relpath": relpaths[i] if relpaths else f"class{i % classes}/{i}.png",
                 "content_hash": _content_hash(root, relpaths[i] if relpaths else None, f"{name}:{i}"),
                 "status": "failed" if i in failed else "ok",
                 "error": "cannot decode image (test)" if i in failed else None} for i in range(n)]
        for start in range(0, n, 2000):
            insert_ignore(session, Sample, rows[start:start + 2000])
        return version.id


def _content_hash(root: Path | None, relpath: str | None, placeholder: str) -> str:
    """The file's sha256 where the test wrote it (runs refuse a file whose bytes differ from the registered hash),
    else a stand-in for rows no run reads."""
    if root is not None and relpath is not None and (root / relpath).is_file():
        return hash_file(root / relpath)
    return hashlib.sha256(placeholder.encode()).hexdigest()


def interrupt_noop_once_at(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    """The noop method raises KeyboardInterrupt (Ctrl-C) the first time it reaches sample `index`."""
    from difftpt_ops.services.running import processors

    original, seen = processors.NoopProcessor.process, {"interrupted": False}

    def interrupt_once(self: processors.NoopProcessor, sample: Any) -> Any:
        if sample.index == index and not seen["interrupted"]:
            seen["interrupted"] = True
            raise KeyboardInterrupt
        return original(self, sample)

    monkeypatch.setattr(processors.NoopProcessor, "process", interrupt_once)


def count(engine: Engine, model: Any, run_id: int) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model).where(model.run_id == run_id)) or 0)


def distinct_predictions(engine: Engine, run_id: int) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count(func.distinct(Prediction.sample_id)))
                                  .where(Prediction.run_id == run_id)) or 0)


def run_state(engine: Engine, run_id: int) -> str:
    with session_scope(engine) as session:
        return str(session.scalar(select(Run.state).where(Run.id == run_id)))


def shard_rows(engine: Engine, run_id: int) -> list[Any]:
    with session_scope(engine) as session:
        return list(session.execute(select(Shard).where(Shard.run_id == run_id).order_by(Shard.index)).scalars())


def error_rows(engine: Engine, run_id: int) -> list[Any]:
    with session_scope(engine) as session:
        return list(session.scalars(select(SampleErrorRow).where(SampleErrorRow.run_id == run_id)))


def read_trace(path: Path) -> list[int]:
    """Sample indices the noop method processed, in order (DIFFTPT_OPS_NOOP_TRACE)."""
    if not path.exists():
        return []
    return [int(line.split()[1]) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2,
             explain: Callable[[], str] | None = None) -> None:
    """Poll `predicate` until it holds; on timeout fail naming `what`, plus what `explain()` says then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"; {explain()}" if explain else ""))


def log_tail(log: Path, lines: int = 15) -> str:
    """The last lines of a worker's log, for a failure message."""
    text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(no log)"]
    return "its log ends:\n" + "\n".join(text)


class RecordingDispatcher:
    """A Dispatcher that keeps the tickets instead of sending them."""

    def __init__(self) -> None:
        self.tickets: list[Any] = []
        self.checked = 0

    def check(self) -> None:
        self.checked += 1

    def send(self, tickets: Sequence[Any]) -> None:
        self.tickets.extend(tickets)


def _others_connected(client: Any, number: int) -> bool:
    """Another connection on database `number` (a worker left running would take our messages)."""
    me = client.client_id()
    return any(int(c["db"]) == number and int(c["id"]) != me for c in client.client_list())


@contextmanager
def redis_db() -> Iterator[str]:
    """A Redis database number no one else uses, claimed with a key, flushed before and after."""
    import redis

    token = uuid.uuid4().hex
    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_URL}/{number}")
        if not client.set("difftpt-test-claim", token, nx=True, ex=1800):
            continue
        if client.dbsize() > 1 or _others_connected(client, number):  # someone's data, or a live consumer
            client.delete("difftpt-test-claim")
            continue
        try:
            yield f"{REDIS_URL}/{number}"
        finally:
            client.flushdb()
        return
    raise RuntimeError("no free Redis database number (1-15)")


def worker_env(settings: Settings, broker_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")}
    env.update(QUIET_MLFLOW)
    env.update({"DIFFTPT_OPS_WORKSPACE": str(settings.workspace), "DIFFTPT_OPS_DATABASE_URL": settings.database_url,
                "DIFFTPT_OPS_BROKER_URL": broker_url, "DIFFTPT_OPS_STALE_AFTER_S": "3",
                "DIFFTPT_OPS_HEARTBEAT_INTERVAL_S": "0.5", "PYTHONPATH": str(REPO_ROOT)})
    env.update({f"DIFFTPT_OPS_{k.upper()}": v for k, v in extra.items()})
    return env


def start_worker(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`difftpt-ops worker --gpus cpu ...` as a subprocess (its own session), logging to `log`."""
    handle = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--gpus", "cpu", *args], env=env,
                            cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def children_of(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in {"Z", "X"}:
            found.append(int(entry.name))
    return found


def stop_worker(process: subprocess.Popen[bytes], *, timeout: float = 30) -> int:
    """SIGTERM the supervisor and wait; kill everything that is left after `timeout`."""
    if process.poll() is None:
        children = children_of(process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_worker(process, children)
    return process.wait()


def kill_worker(process: subprocess.Popen[bytes], children: Sequence[int] | None = None) -> None:
    """kill -9 the Celery worker processes, then the supervisor (before it can restart them)."""
    for pid in children if children is not None else children_of(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.kill()
    process.wait()


def wait_ready(log: Path, workers: int = 1, *, timeout: float = 120) -> None:
    """Wait until `workers` Celery workers logged that they are ready. A worker imports torch, transformers and
    diffusers before its banner (worker_init): seconds alone, much longer on a 2-core box running other tests."""
    wait_for(lambda: log.exists() and log.read_text(errors="replace").count(" ready.") >= workers,
             timeout=timeout, what=f"{workers} worker(s) ready (log: {log})", explain=lambda: log_tail(log))


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_pngs(root: Path, n: int, *, classes: int = 2, size: int = 40) -> list[str]:
    """n small distinct PNGs under root/class<k>/<i>.png; returns their relative paths in index order."""
    from PIL import Image

    relpaths = []
    for i in range(n):
        relpath = f"class{i % classes}/{i}.png"
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), ((i * 50) % 256, (i * 80) % 256, (i * 20 + 120) % 256)).save(root / relpath)
        relpaths.append(relpath)
    return relpaths


def quiet_run_machinery(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs without MLflow reporting, with fresh model caches and progress clocks."""
    from difftpt_ops.services.reading import reporting
    from difftpt_ops.services.running import contexts

    monkeypatch.setattr(reporting, "report_progress", lambda *_: None)
    monkeypatch.setattr(reporting, "report_finished", lambda *_: None)
    monkeypatch.setattr(reporting, "_next_report", {})
    contexts.clear_caches()
