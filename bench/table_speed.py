"""Speed of `difftpt-ops table` over 20 datasets x 10 methods x 1,000 samples (200,000 predictions).

Builds the 15 benchmark datasets (by registered format, so every paper average is computed) plus 5
image folders, one finished run per (method, dataset) and 1,000 synthetic predictions per run (bulk
inserts as in bench/query_speed.py), then times the service call behind `table --published` and its
Markdown rendering, on SQLite and PostgreSQL. Target: under 1 s each. The last line is one JSON object.

    python bench/table_speed.py [--datasets 20] [--methods 10] [--samples 1000] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from query_speed import PRED_COLUMNS, _bulk, _drop_postgres_database, _postgres_database  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from difftpt_ops.db.session import dispose_engines, get_engine, session_scope, upgrade  # noqa: E402
from difftpt_ops.db.tables import Dataset, DatasetVersion, Run  # noqa: E402
from difftpt_ops.services.reading.table import build_table  # noqa: E402
from difftpt_ops.services.reading.table_model import PAPER_ORDER, TableQuery  # noqa: E402
from difftpt_ops.services.reading.table_render import to_markdown  # noqa: E402

TARGET_S = 1.0
N_CLASSES = 100
METHODS = ("zeroshot", "tpt", "difftpt", "ctpt", "zero", "mta", "tda", "dmn-zs", "method-9", "method-10")


def make_datasets(engine: Engine, n_datasets: int, n_samples: int) -> list[tuple[int, str, list[int]]]:
    """(version id, version fingerprint, sample ids) per dataset: the 15 benchmark formats, then image folders."""
    formats = [*PAPER_ORDER, *["imagefolder"] * max(0, n_datasets - len(PAPER_ORDER))][:n_datasets]
    out = []
    for k, fmt in enumerate(formats):
        with session_scope(engine) as session:
            dataset = Dataset(name=f"bench-{k}-{fmt}", format=fmt, root="/bench",
                              class_names=[f"class{i}" for i in range(N_CLASSES)])
            session.add(dataset)
            session.flush()
            version = DatasetVersion(dataset_id=dataset.id, version=1, fingerprint=f"bench-{k}",
                                     num_samples=n_samples, num_failed=0)
            session.add(version)
            session.flush()
            version_id = version.id
        rows = ((version_id, i, f"c/{i}.jpg", i % N_CLASSES, f"{k:08x}{i:056x}", "ok") for i in range(n_samples))
        _bulk(engine, "samples", ("dataset_version_id", "index", "relpath", "label", "content_hash", "status"), rows)
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(text(
                'SELECT id FROM samples WHERE dataset_version_id = :v ORDER BY "index"'), {"v": version_id})]
        out.append((version_id, f"bench-{k}", ids))
    return out


def make_runs(engine: Engine, datasets: list[tuple[int, str, list[int]]], n_methods: int) -> list[tuple[int, int]]:
    """One finished run per (method, dataset); returns (run id, dataset index)."""
    now = datetime.now(UTC)
    runs: list[tuple[Run, int]] = []
    with session_scope(engine) as session:
        for d, (version_id, fingerprint, sample_ids) in enumerate(datasets):
            for method in METHODS[:n_methods]:
                spec = {"kind": "tune", "method": {"method": method}, "model": {"name": "ViT-B-16"},
                        "dataset_fingerprint": fingerprint, "seed": 0}
                run = Run(kind="tune", fingerprint=f"{fingerprint}-{method}".ljust(64, "0")[:64], spec=spec,
                          method=method, dataset_version_id=version_id, state="finished",
                          num_samples=len(sample_ids), shard_size=64, created_at=now)
                session.add(run)
                runs.append((run, d))
        session.flush()
        return [(run.id, d) for run, d in runs]


def prediction_rows(runs: list[tuple[int, int]], datasets: list[tuple[int, str, list[int]]],
                    pg: bool) -> Iterator[tuple[Any, ...]]:
    """Each run has its own accuracy; zero-shot is a fixed 60%."""
    rng = random.Random(0)
    now: Any = datetime.now(UTC) if pg else datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    for k, (run_id, d) in enumerate(runs):
        accuracy = 0.5 + 0.03 * (k % 10)
        for index, sample_id in enumerate(datasets[d][2]):
            label = index % N_CLASSES
            correct = rng.random() < accuracy
            pred = label if correct else (label + 1) % N_CLASSES
            zs = rng.random() < 0.6
            yield (run_id, sample_id, index, label, pred, f"[{pred}]", correct, correct or rng.random() < 0.5,
                   label if zs else (label + 2) % N_CLASSES, zs, 1.2, 0.8, 0.4, rng.random(), 64, 6, 0.25, "bench",
                   now)


def _time(fn: Any, repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"first_s": round(times[0], 4), "best_s": round(min(times), 4)}


def bench_backend(url: str, *, n_datasets: int, n_methods: int, n_samples: int, repeat: int) -> dict[str, Any]:
    engine = get_engine(url)
    upgrade(engine)
    start = time.perf_counter()
    datasets = make_datasets(engine, n_datasets, n_samples)
    runs = make_runs(engine, datasets, n_methods)
    pg = engine.dialect.name == "postgresql"
    _bulk(engine, "predictions", PRED_COLUMNS, prediction_rows(runs, datasets, pg))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE" if pg else "ANALYZE"))
    load_s = time.perf_counter() - start
    sys.stderr.write(f"{engine.dialect.name}: {len(runs)} runs, {len(runs) * n_samples} predictions in "
                     f"{load_s:.1f} s\n")
    table = build_table(engine, TableQuery(published=True))
    cells = sum(len(r.cells) for r in table.rows if r.kind == "ours")
    assert cells == len(runs), f"expected {len(runs)} cells, got {cells}"
    return {"load_s": round(load_s, 1), "cells": cells,
            "table": _time(lambda: build_table(engine, TableQuery(published=True)), repeat),
            "table_markdown": _time(lambda: to_markdown(build_table(engine, TableQuery(published=True))), repeat),
            "table_top5": _time(lambda: build_table(engine, TableQuery(metric="top5")), repeat),
            "table_ece": _time(lambda: build_table(engine, TableQuery(metric="ece")), repeat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=20)
    parser.add_argument("--methods", type=int, default=10, choices=range(1, len(METHODS) + 1))
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres-url", default=os.environ.get(
        "DIFFTPT_OPS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    sizes = {"n_datasets": args.datasets, "n_methods": args.methods, "n_samples": args.samples,
             "repeat": args.repeat}
    out: dict[str, Any] = {"bench": "table_speed", "datasets": args.datasets, "methods": args.methods,
                           "samples_per_run": args.samples, "predictions": args.datasets * args.methods * args.samples,
                           "target_s": TARGET_S}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = bench_backend(f"sqlite:///{tmp}/bench.db", **sizes)
        dispose_engines()
    if not args.skip_postgres:
        url = _postgres_database(args.postgres_url)
        try:
            out["postgresql"] = bench_backend(url, **sizes)
        finally:
            _drop_postgres_database(args.postgres_url, url)
    checked = [out[b][q]["best_s"] for b in ("sqlite", "postgresql") if b in out for q in ("table", "table_markdown")]
    out["meets_target"] = all(t < TARGET_S for t in checked)
    sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
