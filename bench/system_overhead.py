"""System overhead of the job system: pure bookkeeping (method `noop`, no model work).

Measures, on a fresh workspace:

1. samples/s of 10,000 samples through the embedded executor (target >= 2,000);
2. samples/s of 10,000 samples through Celery + Redis with a real `difftpt-ops worker --gpus cpu`
   subprocess at the default shard size (target >= 500), from submit until the run is finished;
3. the time `submit` takes to find that a finished 100,000-sample run has nothing left to do
   (target < 3 s), through the service and through the CLI (a new process, imports included).

Samples are bulk-inserted rows (noop reads no image). Each path gets a warm-up run first, so one-off
imports are not counted. MLflow tracking is not measured by default (`--tracking off`: the tracking
URI `none` turns the reporting hooks off); `--tracking on` includes them, with an MLflow database in
the workspace.

Usage: python bench/system_overhead.py [--database-url URL] [--redis-url redis://127.0.0.1:6379/N]
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import insert, select  # noqa: E402

from difftpt_ops.config import Settings, load_settings  # noqa: E402
from difftpt_ops.db.session import session_scope, upgrade  # noqa: E402
from difftpt_ops.db.tables import Dataset, DatasetVersion, Run, Sample  # noqa: E402
from difftpt_ops.services.running import runs  # noqa: E402
from difftpt_ops.services.workspace import open_database  # noqa: E402

TARGETS = {"embedded_samples_per_s": 2000.0, "celery_redis_samples_per_s": 500.0, "resubmit_finished_100k_s": 3.0}


def say(message: str) -> None:
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


def add_samples(engine: Any, name: str, n: int) -> None:
    """A dataset of n sample rows, bulk-inserted (executemany), no files."""
    with session_scope(engine) as session:
        dataset = Dataset(name=name, format="imagefolder", root="/nonexistent",
                          class_names=[f"class{i}" for i in range(100)])
        session.add(dataset)
        session.flush()
        version = DatasetVersion(dataset_id=dataset.id, version=1, num_samples=n, num_failed=0,
                                 fingerprint=hashlib.sha256(f"{name}:{n}".encode()).hexdigest())
        session.add(version)
        session.flush()
        rows = [{"dataset_version_id": version.id, "index": i, "relpath": f"c{i % 100}/{i}.jpg", "label": i % 100,
                 "content_hash": hashlib.sha256(f"{name}:{i}".encode()).hexdigest(), "status": "ok"}
                for i in range(n)]
        for start in range(0, n, 20_000):
            session.execute(insert(Sample.__table__), rows[start:start + 20_000])


def wait_finished(engine: Any, run_id: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(engine) as session:
            state = session.scalar(select(Run.state).where(Run.id == run_id))
        if state in {"finished", "finished_with_failures", "failed", "cancelled"}:
            if state != "finished":
                raise RuntimeError(f"run {run_id} ended {state}")
            return
        time.sleep(0.05)
    raise TimeoutError(f"run {run_id} did not finish in {timeout} s")


def measure_embedded(engine: Any, settings: Settings) -> float:
    runs.submit_tune(engine, settings, dataset_ref="warm", method="noop")
    started = time.perf_counter()
    result = runs.submit_tune(engine, settings, dataset_ref="bench10k", method="noop")
    elapsed = time.perf_counter() - started
    assert result.state == "finished", result
    say(f"embedded: 10,000 samples in {elapsed:.2f} s")
    return 10_000 / elapsed


def _worker_env(settings: Settings, broker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")}
    env.update({"DIFFTPT_OPS_WORKSPACE": str(settings.workspace), "DIFFTPT_OPS_DATABASE_URL": settings.database_url,
                "DIFFTPT_OPS_BROKER_URL": broker, "DIFFTPT_OPS_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
                "PYTHONPATH": str(REPO_ROOT)})
    return env


def measure_celery(engine: Any, settings: Settings, broker: str, workdir: Path) -> float:
    from workers.tasks import dispatcher_for

    log = workdir / "worker.log"
    with log.open("wb") as handle:
        worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--gpus", "cpu"],
                                  env=_worker_env(settings, broker), cwd=REPO_ROOT, stdout=handle,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dispatcher = dispatcher_for(settings)
        warm = runs.submit_tune(engine, settings, dataset_ref="warm", method="noop", seed=1, dispatcher=dispatcher)
        wait_finished(engine, warm.run_id)
        started = time.perf_counter()
        result = runs.submit_tune(engine, settings, dataset_ref="bench10k", method="noop", seed=1,
                                  dispatcher=dispatcher)
        wait_finished(engine, result.run_id)
        elapsed = time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(timeout=120)
    say(f"celery+redis: 10,000 samples in {elapsed:.2f} s ({result.shards_total} shards)")
    return 10_000 / elapsed


def measure_resubmit(engine: Any, settings: Settings) -> dict[str, float]:
    started = time.perf_counter()
    first = runs.submit_tune(engine, settings, dataset_ref="bench100k", method="noop")
    executed = time.perf_counter() - started
    assert first.state == "finished", first
    say(f"embedded: 100,000 samples in {executed:.1f} s; now resubmitting")
    started = time.perf_counter()
    again = runs.submit_tune(engine, settings, dataset_ref="bench100k", method="noop")
    service_s = time.perf_counter() - started
    assert (again.created, again.shards_dispatched) == (False, 0), again
    env = {**os.environ, "DIFFTPT_OPS_WORKSPACE": str(settings.workspace),
           "DIFFTPT_OPS_DATABASE_URL": settings.database_url}
    started = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "cli.main", "submit", "tune", "--dataset", "bench100k", "--method",
                          "noop", "--json"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    cli_s = time.perf_counter() - started
    assert json.loads(cli.stdout)["shards_dispatched"] == 0, cli.stdout
    return {"resubmit_finished_100k_s": service_s, "resubmit_finished_100k_cli_s": cli_s,
            "embedded_100k_samples_per_s": 100_000 / executed}


def _claim_redis(base: str) -> str:
    import redis

    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{base}/{number}")
        if client.dbsize() == 0 and client.set("difftpt-bench-claim", "1", nx=True, ex=3600):
            return f"{base}/{number}"
    raise RuntimeError("no empty Redis database; pass --redis-url")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: SQLite in a fresh workspace (the embedded default)")
    parser.add_argument("--redis-url", help="a Redis database of its own (default: a free one on 127.0.0.1:6379)")
    parser.add_argument("--tracking", choices=["off", "on"], default="off")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="difftpt-bench-"))
    env = {"DIFFTPT_OPS_DATABASE_URL": args.database_url or f"sqlite:///{workdir / 'difftpt.db'}"}
    if args.tracking == "off":
        env["DIFFTPT_OPS_MLFLOW_TRACKING_URI"] = "none"
    settings = load_settings(workdir, env=env)
    engine = open_database(settings, auto_upgrade=True)
    upgrade(engine)
    for name, n in (("warm", 256), ("bench10k", 10_000), ("bench100k", 100_000)):
        add_samples(engine, name, n)
    broker = args.redis_url or _claim_redis("redis://127.0.0.1:6379")
    celery_settings = load_settings(workdir, env={**env, "DIFFTPT_OPS_BROKER_URL": broker})
    try:
        result: dict[str, Any] = {"embedded_samples_per_s": measure_embedded(engine, settings)}
        result["celery_redis_samples_per_s"] = measure_celery(engine, celery_settings, broker, workdir)
        result.update(measure_resubmit(engine, settings))
    finally:
        if not args.redis_url:
            import redis

            redis.Redis.from_url(broker).flushdb()
    result = {key: round(value, 3) for key, value in result.items()}
    met = {key: (result[key] >= target if key.endswith("per_s") else result[key] < target)
           for key, target in TARGETS.items()}
    result.update(database=engine.dialect.name, shard_size=settings.shard_size, tracking=args.tracking,
                  cpus=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2), targets=TARGETS, met=met)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
