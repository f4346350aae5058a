"""Speed of `results`, `results --by-class` and `compare` on a million predictions, SQLite and PostgreSQL.

Builds 20 synthetic runs of 50,000 predictions each over one 1,000-class dataset version (bulk
inserts: executemany on SQLite, COPY on PostgreSQL), then times the three service calls the CLI makes.
Target: each under 1 s. The last line of output is one JSON object.

    python bench/query_speed.py [--rows 1000000] [--runs 20] [--interleaved] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Engine, make_url  # noqa: E402

from difftpt_ops.db.session import dispose_engines, get_engine, session_scope, upgrade  # noqa: E402
from difftpt_ops.db.tables import Dataset, DatasetVersion, Run  # noqa: E402
from difftpt_ops.services.reading.results import compare_runs, run_results  # noqa: E402

TARGET_S = 1.0
PRED_COLUMNS = ("run_id", "sample_id", "sample_index", "label", "pred", "top5", "correct", "top5_correct",
                "zeroshot_pred", "zeroshot_correct", "entropy_before", "entropy_after", "confidence_before",
                "confidence_after", "n_views", "n_kept", "seconds", "worker", "created_at")


def _log(message: str) -> None:
    sys.stderr.write(message + "\n")


def make_runs(engine: Engine, n_samples: int, n_runs: int, n_classes: int) -> tuple[list[int], list[int]]:
    """One dataset version with `n_samples` samples and `n_runs` runs; returns (run ids, sample ids)."""
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        dataset = Dataset(name="bench", format="imagefolder", root="/bench",
                          class_names=[f"class{i}" for i in range(n_classes)])
        session.add(dataset)
        session.flush()
        version = DatasetVersion(dataset_id=dataset.id, version=1, fingerprint="bench", num_samples=n_samples,
                                 num_failed=0)
        session.add(version)
        session.flush()
        version_id = version.id
    sample_rows = [(version_id, i, f"class{i % n_classes}/{i}.jpg", i % n_classes, f"{i:064x}", "ok")
                   for i in range(n_samples)]
    _bulk(engine, "samples", ("dataset_version_id", "index", "relpath", "label", "content_hash", "status"),
          iter(sample_rows))
    with session_scope(engine) as session:
        runs = [Run(kind="tune", fingerprint=f"{k:064x}", spec={"k": k}, method=("zeroshot", "tpt", "difftpt")[k % 3],
                    dataset_version_id=version_id, state="finished", num_samples=n_samples, shard_size=64,
                    created_at=now) for k in range(n_runs)]
        session.add_all(runs)
        session.flush()
        run_ids = [r.id for r in runs]
    with engine.connect() as conn:
        sample_ids = [row[0] for row in conn.execute(text(
            "SELECT id FROM samples WHERE dataset_version_id = :v ORDER BY \"index\""), {"v": version_id})]
    return run_ids, sample_ids


def prediction_rows(run_ids: list[int], sample_ids: list[int], n_classes: int, pg: bool,
                    interleaved: bool = False) -> Iterator[tuple]:
    """Synthetic predictions: each run has its own accuracy, zero-shot is a fixed 60%.

    Rows are stored run after run, or with `interleaved` sample-major, as when runs execute at the same
    time: then one run's rows are spread over the whole table.
    """
    rng = random.Random(0)
    now: Any = datetime.now(UTC) if pg else datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    zs = [rng.random() < 0.6 for _ in sample_ids]
    runs = list(enumerate(run_ids))
    samples = list(enumerate(sample_ids))
    pairs = ((r, s) for s in samples for r in runs) if interleaved else ((r, s) for r in runs for s in samples)
    for (k, run_id), (index, sample_id) in pairs:
        accuracy = 0.55 + 0.01 * k
        label = index % n_classes
        correct = rng.random() < accuracy
        pred = label if correct else (label + 1) % n_classes
        conf = rng.random()
        yield (run_id, sample_id, index, label, pred, f"[{pred}, {(pred + 1) % n_classes}]", correct,
               correct or rng.random() < 0.5, label if zs[index] else (label + 2) % n_classes, zs[index],
               1.2, 0.8, 0.4, conf, 64, 6, 0.25, "bench", now)


def _bulk(engine: Engine, table: str, columns: tuple[str, ...], rows: Iterator[tuple]) -> None:
    """COPY on PostgreSQL, executemany in one transaction on SQLite."""
    quoted = ", ".join(f'"{c}"' for c in columns)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "postgresql":
            with cursor.copy(f"COPY {table} ({quoted}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" for _ in columns)
            cursor.executemany(f"INSERT INTO {table} ({quoted}) VALUES ({marks})", rows)
        raw.commit()
    finally:
        raw.close()


def _time(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"first_s": round(times[0], 4), "best_s": round(min(times), 4)}


def bench_backend(url: str, *, n_rows: int, n_runs: int, n_classes: int, repeat: int,
                  interleaved: bool) -> dict[str, Any]:
    """Fill the database at `url`, then time the three queries (best of `repeat`)."""
    engine = get_engine(url)
    upgrade(engine)
    start = time.perf_counter()
    run_ids, sample_ids = make_runs(engine, n_rows // n_runs, n_runs, n_classes)
    pg = engine.dialect.name == "postgresql"
    _bulk(engine, "predictions", PRED_COLUMNS, prediction_rows(run_ids, sample_ids, n_classes, pg, interleaved))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE" if pg else "ANALYZE"))  # planner statistics, as after normal use
    load_s = time.perf_counter() - start
    _log(f"{engine.dialect.name}: loaded {n_rows} predictions in {load_s:.1f} s")
    a, b = run_ids[len(run_ids) // 2], run_ids[-1]
    timings = {
        "results": _time(lambda: run_results(engine, a), repeat),
        "results_by_class": _time(lambda: run_results(engine, a, by_class=True), repeat),
        "compare": _time(lambda: compare_runs(engine, a, b), repeat),
    }
    with engine.connect() as conn:
        timings["view_run_summary"] = _time(lambda: conn.execute(text("SELECT * FROM run_summary")).all(), 1)
        timings["view_run_pair_comparison"] = _time(lambda: conn.execute(text(
            "SELECT * FROM run_pair_comparison WHERE run_a = :a AND run_b = :b"), {"a": a, "b": b}).all(), 1)
    return {"load_s": round(load_s, 1), **timings}


def _postgres_database(admin_url: str) -> str:
    name = f"difftpt_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _drop_postgres_database(admin_url: str, url: str) -> None:
    dispose_engines()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres-url", default=os.environ.get(
        "DIFFTPT_OPS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--interleaved", action="store_true",
                        help="store the runs' rows interleaved, as when runs execute concurrently")
    args = parser.parse_args()
    sizes = {"n_rows": args.rows, "n_runs": args.runs, "n_classes": args.classes, "repeat": args.repeat,
             "interleaved": args.interleaved}
    out: dict[str, Any] = {"bench": "query_speed", "rows": args.rows, "runs": args.runs, "classes": args.classes,
                           "interleaved": args.interleaved, "target_s": TARGET_S}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = bench_backend(f"sqlite:///{tmp}/bench.db", **sizes)
        dispose_engines()
    if not args.skip_postgres:
        url = _postgres_database(args.postgres_url)
        try:
            out["postgresql"] = bench_backend(url, **sizes)
        finally:
            _drop_postgres_database(args.postgres_url, url)
    checked = [out[b][q]["best_s"] for b in ("sqlite", "postgresql") if b in out
               for q in ("results", "results_by_class", "compare")]
    out["meets_target"] = all(t < TARGET_S for t in checked)
    sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
