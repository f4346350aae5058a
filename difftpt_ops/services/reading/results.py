"""Results of runs: accuracy and calibration, per class, paired comparison, export.

Every aggregate is computed by the database (COUNT/SUM ... GROUP BY on one run's rows, answered from
migration 0002's covering indexes), so a run costs an index scan, never a million Python objects.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from difftpt_ops.core.errors import InputError, NotFoundError
from difftpt_ops.db.tables import Dataset, DatasetVersion, Prediction, Run, Sample
from difftpt_ops.services.reading import stats
from difftpt_ops.services.reading.groups import order_group_stats, run_groups

EXPORT_FORMATS = ("parquet", "csv")
_EXPORT_CHUNK = 50_000


@dataclass(frozen=True)
class RunInfo:
    """The run row plus its dataset's name, version and class names."""

    run: Run
    dataset: str
    dataset_version: int
    dataset_root: str
    class_names: list[str]


def load_run_info(conn: Connection, run_id: int, argument: str = "RUN") -> RunInfo:
    """The run and its dataset; NotFoundError naming `argument` when there is no such run."""
    with Session(bind=conn) as session:  # the Run row stays readable after the session closes
        row = session.execute(
            select(Run, Dataset.name, DatasetVersion.version, Dataset.root, Dataset.class_names)
            .join(DatasetVersion, DatasetVersion.id == Run.dataset_version_id)
            .join(Dataset, Dataset.id == DatasetVersion.dataset_id)
            .where(Run.id == run_id)
        ).first()
    if row is None:
        raise NotFoundError(argument, run_id, "no such run; `difftpt-ops runs list` shows the runs")
    return RunInfo(run=row[0], dataset=row[1], dataset_version=row[2], dataset_root=row[3],
                   class_names=list(row[4] or []))


def load_tune_run_info(conn: Connection, run_id: int, argument: str = "RUN") -> RunInfo:
    """As load_run_info, for a run with predictions: InputError naming `argument` for a generation run."""
    info = load_run_info(conn, run_id, argument)
    if info.run.kind != "tune":
        made = "stored view features" if info.run.kind == "features" else "images"
        raise InputError(argument, run_id, f"is a {info.run.kind} run: it makes {made}, not predictions "
                                           f"(`difftpt-ops status {run_id}` shows its progress)")
    return info


def _ratio(numerator: int | None, denominator: int | None) -> float | None:
    return numerator / denominator if denominator else None


def _summary_counts(conn: Connection, run_id: int) -> dict[str, Any]:
    row = conn.execute(text("""
        SELECT COUNT(*) AS done,
               SUM(CASE WHEN correct THEN 1 ELSE 0 END) AS correct,
               SUM(CASE WHEN top5_correct THEN 1 ELSE 0 END) AS top5,
               COUNT(zeroshot_correct) AS zs_n,
               SUM(CASE WHEN zeroshot_correct THEN 1 ELSE 0 END) AS zs_correct,
               SUM(CASE WHEN zeroshot_correct IS NOT NULL AND correct THEN 1 ELSE 0 END) AS correct_on_zs,
               AVG(seconds) AS mean_seconds
        FROM predictions WHERE run_id = :run_id"""), {"run_id": run_id}).mappings().one()
    return {key: (int(value) if key != "mean_seconds" and value is not None else value)
            for key, value in row.items()}


def failed_count(conn: Connection, run_id: int) -> int:
    """Samples with an error row and no prediction (a retry that succeeded does not count)."""
    return int(conn.execute(text("""
        SELECT COUNT(*) FROM sample_errors e WHERE e.run_id = :run_id AND NOT EXISTS (
            SELECT 1 FROM predictions p WHERE p.run_id = e.run_id AND p.sample_id = e.sample_id)"""),
        {"run_id": run_id}).scalar_one())


def confidence_bin_sql(dialect: str, n_bins: int) -> str:
    """SQL of the bin of `confidence_after` among `n_bins` equal-width bins (i/n, (i+1)/n], 0 in bin 0: what
    `stats.confidence_bin` computes."""
    n_bins = stats.check_ece_bins(n_bins)  # an integer: it is written into the SQL
    scaled = f"(confidence_after * {n_bins})"
    if dialect == "postgresql":
        return f"LEAST(GREATEST(CAST(CEIL({scaled}) AS INTEGER) - 1, 0), {n_bins - 1})"
    # a portable ceil: SQLite's math functions are a compile-time option
    return f"MIN(MAX(CAST({scaled} AS INTEGER) + ({scaled} > CAST({scaled} AS INTEGER)) - 1, 0), {n_bins - 1})"


def calibration_bins(conn: Connection, run_id: int, n_bins: int = stats.ECE_BINS) -> list[stats.CalibrationBin]:
    """Equal-width bins of confidence_after, (i/n, (i+1)/n], counted by the database."""
    rows = conn.execute(text(f"""
        SELECT b, COUNT(*), SUM(c), SUM(conf) FROM (
            SELECT {confidence_bin_sql(conn.dialect.name, n_bins)} AS b, CASE WHEN correct THEN 1 ELSE 0 END AS c,
                   confidence_after AS conf
            FROM predictions WHERE run_id = :run_id AND confidence_after IS NOT NULL) t
        GROUP BY b ORDER BY b"""), {"run_id": run_id}).all()
    found = {int(b): stats.CalibrationBin(int(b), int(n), int(c), float(s)) for b, n, c, s in rows}
    return [found.get(i, stats.CalibrationBin(i, 0, 0, 0.0)) for i in range(n_bins)]


def per_class(conn: Connection, run_id: int, class_names: list[str]) -> list[dict[str, Any]]:
    """Per label: samples, correct, top-1, zero-shot top-1 and gain, with the class name."""
    rows = conn.execute(text("""
        SELECT label, COUNT(*), SUM(CASE WHEN correct THEN 1 ELSE 0 END),
               COUNT(zeroshot_correct), SUM(CASE WHEN zeroshot_correct THEN 1 ELSE 0 END)
        FROM predictions WHERE run_id = :run_id GROUP BY label ORDER BY label"""), {"run_id": run_id}).all()
    out = []
    for label, n, correct, zs_n, zs_correct in rows:
        top1, zs = _ratio(int(correct), int(n)), _ratio(int(zs_correct or 0), int(zs_n))
        out.append({
            "label": int(label), "name": class_names[label] if 0 <= label < len(class_names) else None,
            "n": int(n), "correct": int(correct), "top1": top1, "zeroshot_top1": zs,
            "gain": None if top1 is None or zs is None else top1 - zs,
        })
    return out


def gpu_hours(conn: Connection, run_id: int) -> float:
    """Model seconds of the run's shards that ran on a GPU, in hours (0 on CPU)."""
    seconds = conn.execute(text("""
        SELECT COALESCE(SUM(seconds), 0) FROM shards
        WHERE run_id = :run_id AND gpu IS NOT NULL AND gpu <> '' AND LOWER(gpu) <> 'cpu'"""),
        {"run_id": run_id}).scalar_one()
    return float(seconds) / 3600.0


def running_top1(conn: Connection, run_id: int, every: int, *, include_last: bool = False) -> list[tuple[int, float]]:
    """(samples done, top-1 over those samples) at every `every` predictions, in the order they were stored;
    `include_last` adds the point at the last prediction (a finished run's curve ends at its final top-1, and a
    run shorter than `every` gets a point at all)."""
    rows = conn.execute(text("""
        SELECT n, c FROM (
            SELECT ROW_NUMBER() OVER (ORDER BY id) AS n, COUNT(*) OVER () AS total,
                   SUM(CASE WHEN correct THEN 1 ELSE 0 END) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS c
            FROM predictions WHERE run_id = :run_id) t
        WHERE n % :every = 0 OR (:last AND n = total) ORDER BY n"""),
        {"run_id": run_id, "every": max(1, int(every)), "last": bool(include_last)}).all()
    return [(int(n), int(c) / int(n)) for n, c in rows]


def view_grid_data(conn: Connection, info: RunInfo, *, max_samples: int = 4,
                   max_variants: int = 8) -> list[dict[str, Any]]:
    """For a DiffTPT run: a few finished samples with their generated variations in variant order.

    Each is {relpath, label, pred, correct, variants: [{artifact_key, cosine, kept}]}. The i-th view score
    of kind 'generated' (in view_index order) belongs to the i-th variation (in variant_index order).
    """
    run = info.run
    if run.generation_config_id is None:
        return []
    samples = conn.execute(text("""
        SELECT s.id, s.relpath, s.content_hash, p.label, p.pred, p.correct
        FROM predictions p JOIN samples s ON s.id = p.sample_id
        WHERE p.run_id = :run_id AND EXISTS (SELECT 1 FROM generated_images g
            WHERE g.generation_config_id = :config AND g.source_hash = s.content_hash)
        ORDER BY p.sample_index LIMIT :limit"""),
        {"run_id": run.id, "config": run.generation_config_id, "limit": max_samples}).all()
    out = []
    for sample_id, relpath, content_hash, label, pred, correct in samples:
        keys = conn.execute(text("""
            SELECT artifact_key FROM generated_images WHERE generation_config_id = :config AND source_hash = :hash
            ORDER BY variant_index LIMIT :limit"""),
            {"config": run.generation_config_id, "hash": content_hash, "limit": max_variants}).scalars().all()
        scores = conn.execute(text("""
            SELECT cosine, kept FROM view_scores WHERE run_id = :run_id AND sample_id = :sample_id
            AND kind = 'generated' ORDER BY view_index LIMIT :limit"""),
            {"run_id": run.id, "sample_id": sample_id, "limit": max_variants}).all()
        variants = [{"artifact_key": key, "cosine": scores[i][0] if i < len(scores) else None,
                     "kept": bool(scores[i][1]) if i < len(scores) else None} for i, key in enumerate(keys)]
        out.append({"relpath": relpath, "label": int(label), "pred": int(pred), "correct": bool(correct),
                    "variants": variants})
    return out


def summarise(conn: Connection, info: RunInfo, *, by_class: bool = False, ece_bins: int = stats.ECE_BINS
              ) -> dict[str, Any]:
    """`run_results` on an open connection and a loaded run."""
    run, counts = info.run, _summary_counts(conn, info.run.id)
    done, failed = counts["done"], failed_count(conn, run.id)
    top1 = _ratio(counts["correct"], done)
    zeroshot = _ratio(counts["zs_correct"], counts["zs_n"])
    result: dict[str, Any] = {
        "run_id": run.id, "method": run.method, "state": run.state, "dataset": info.dataset,
        "dataset_version": info.dataset_version, "num_samples": run.num_samples,
        "done": done, "failed": failed, "pending": max(0, run.num_samples - done - failed),
        "top1": top1, "top1_ci95": list(stats.wilson_interval(counts["correct"] or 0, done)) if done else None,
        "top5": _ratio(counts["top5"], done), "zeroshot_top1": zeroshot, "zeroshot_samples": counts["zs_n"],
        # Gain on the samples that have a zero-shot prediction, so both accuracies count the same samples.
        "gain": None if zeroshot is None else _ratio(counts["correct_on_zs"], counts["zs_n"]) - zeroshot,
        "ece": stats.expected_calibration_error(calibration_bins(conn, run.id, ece_bins)),
        "mean_seconds": counts["mean_seconds"], "mlflow_run_id": run.mlflow_run_id,
        "ece_bins": ece_bins,  # last: `results --csv` keeps the columns it had before it existed in place
    }
    if by_class:
        result["classes"] = per_class(conn, run.id, info.class_names)
    return result


def run_results(engine: Engine, run_id: int, by_class: bool = False, ece_bins: int = stats.ECE_BINS
                ) -> dict[str, Any]:
    """Top-1, top-5, zero-shot top-1 on the same samples, gain, ECE over `ece_bins` equal-width bins (15 unless
    given; C-TPT's code uses 20), done/failed/pending, mean seconds.

    Args:
        engine: the database.
        run_id: the run; NotFoundError (argument RUN) when unknown.
        by_class: add `classes`, a list of {label, name, n, correct, top1, zeroshot_top1, gain}.
        ece_bins: ECE's bin count; InputError (argument --ece-bins) outside 1..MAX_ECE_BINS.
    """
    stats.check_ece_bins(ece_bins)
    with engine.connect() as conn:
        summary = summarise(conn, load_tune_run_info(conn, run_id), by_class=by_class, ece_bins=ece_bins)
    orders = order_group_stats(engine, run_id)  # an online run with sibling orders: top-1 over the orders
    return {**summary, "orders": orders} if orders else summary


def compare_runs(engine: Engine, run_a: int, run_b: int) -> dict[str, Any]:
    """Paired comparison of two runs on the samples both finished.

    Returns the 2x2 counts (both right, only A, only B, both wrong), both accuracies, their difference
    with a 95% Newcombe (1998, method 10) hybrid score interval, and the exact two-sided McNemar p-value
    (binomial test of the discordant pairs against 1/2).
    """
    with engine.connect() as conn:
        a, b = load_tune_run_info(conn, run_a, "RUN_A"), load_tune_run_info(conn, run_b, "RUN_B")
        if a.run.dataset_version_id != b.run.dataset_version_id:
            raise InputError("RUN_B", run_b, f"is on {b.dataset}@{b.dataset_version} but RUN_A={run_a} is on "
                             f"{a.dataset}@{a.dataset_version}: compare needs both runs on the same dataset version")
        row = conn.execute(text("""
            SELECT COUNT(*),
                   SUM(CASE WHEN a.correct AND b.correct THEN 1 ELSE 0 END),
                   SUM(CASE WHEN a.correct AND NOT b.correct THEN 1 ELSE 0 END),
                   SUM(CASE WHEN b.correct AND NOT a.correct THEN 1 ELSE 0 END)
            FROM predictions a JOIN predictions b ON b.run_id = :run_b AND b.sample_id = a.sample_id
            WHERE a.run_id = :run_a"""), {"run_a": run_a, "run_b": run_b}).one()
        weights = recorded_weights(conn, [run_a, run_b])
    weights_a, weights_b = weights.get(run_a), weights.get(run_b)
    n, both, only_a, only_b = (int(v or 0) for v in row)
    neither = n - both - only_a - only_b
    low, high = stats.paired_difference_interval(both, only_a, only_b, neither)
    same_name_other_weights = (a.run.model_name == b.run.model_name and None not in (weights_a, weights_b)
                               and weights_a != weights_b)
    return {
        "run_a": {"run_id": run_a, "method": a.run.method, "state": a.run.state, "model": a.run.model_name,
                  "weights": weights_a},
        "run_b": {"run_id": run_b, "method": b.run.method, "state": b.run.state, "model": b.run.model_name,
                  "weights": weights_b},
        "same_model_other_weights": same_name_other_weights,
        "dataset": a.dataset, "dataset_version": a.dataset_version, "paired_samples": n,
        "both_right": both, "only_a": only_a, "only_b": only_b, "both_wrong": neither,
        "top1_a": _ratio(both + only_a, n), "top1_b": _ratio(both + only_b, n),
        "difference": _ratio(only_a - only_b, n), "difference_ci95": [low, high] if n else None,
        "ci_method": "Newcombe hybrid score (1998, method 10)",
        "mcnemar_p": stats.mcnemar_exact_p(only_a, only_b),
        **_order_groups(engine, run_a, run_b),
        **_run_groups(engine, run_a, run_b),
    }


def recorded_weights(conn: Connection, run_ids: Sequence[int]) -> dict[int, str]:
    """Run id -> the sha256 of the CLIP weights its shards recorded (one per run: a shard that finds other weights
    fails), read in SQL as a distinct JSON field; runs whose shards recorded none are left out."""
    from difftpt_ops.db.tables import Shard

    weights = Shard.provenance["weights"].as_string()
    return {int(run_id): str(digest) for run_id, digest in conn.execute(
        select(Shard.run_id, weights).distinct().where(Shard.run_id.in_(list(run_ids)), weights.is_not(None)))}


def _run_groups(engine: Engine, run_a: int, run_b: int) -> dict[str, Any]:
    """Each side's sweeps and, when other runs repeat it with other seeds, top-1 over them."""
    groups = {"groups_a": run_groups(engine, run_a), "groups_b": run_groups(engine, run_b)}
    return {key: value for key, value in groups.items() if value}


def _order_groups(engine: Engine, run_a: int, run_b: int) -> dict[str, Any]:
    """Top-1 over the order seeds of each side, for online runs that have sibling orders."""
    groups = {"orders_a": order_group_stats(engine, run_a), "orders_b": order_group_stats(engine, run_b)}
    return {key: value for key, value in groups.items() if value}


EXPORT_COLUMNS = (
    "sample_id", "sample_index", "relpath", "label", "label_name", "pred", "pred_name", "top5", "correct",
    "top5_correct", "zeroshot_pred", "zeroshot_correct", "confidence_before", "confidence_after",
    "entropy_before", "entropy_after", "n_views", "n_kept", "seconds", "worker",
)


def iter_prediction_rows(conn: Connection, info: RunInfo, chunk: int = _EXPORT_CHUNK) -> Iterator[list[dict[str, Any]]]:
    """The run's predictions in sample order, with paths and class names, in chunks of dicts."""
    p = Prediction.__table__.c
    stmt = (select(p.sample_id, p.sample_index, Sample.relpath, p.label, p.pred, p.top5, p.correct, p.top5_correct,
                   p.zeroshot_pred, p.zeroshot_correct, p.confidence_before, p.confidence_after,
                   p.entropy_before, p.entropy_after, p.n_views, p.n_kept, p.seconds, p.worker)
            .join(Sample, Sample.id == p.sample_id).where(p.run_id == info.run.id).order_by(p.sample_index))
    names = info.class_names

    def name(label: int | None) -> str | None:
        return names[label] if label is not None and 0 <= label < len(names) else None

    result = conn.execution_options(stream_results=True, yield_per=chunk).execute(stmt)
    for part in result.mappings().partitions(chunk):
        yield [{**row, "label_name": name(row["label"]), "pred_name": name(row["pred"])} for row in part]


def export_run(engine: Engine, run_id: int, path: str | Path, format: str = "parquet") -> dict[str, Any]:
    """Write the run's per-sample predictions to `path` as Parquet or CSV; returns {path, format, rows} (and
    `provenance_path` for CSV).

    Parquet carries what made the rows in its own metadata; a CSV file cannot, so it gets a JSON file beside it,
    `<path>.provenance.json`, with the same facts (`export_metadata`)."""
    if format not in EXPORT_FORMATS:
        raise InputError("--format", format, f"must be one of {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    with engine.connect() as conn:
        load_tune_run_info(conn, run_id)
    _check_output(path)
    sidecar = provenance_path(path) if format == "csv" else None
    if sidecar is not None:
        _check_output(sidecar)
    # Both files are written under temporary names and renamed when complete: a failure leaves no half file.
    partial = path.with_name(f".{path.name}.partial")
    partial_sidecar = sidecar.with_name(f".{sidecar.name}.partial") if sidecar is not None else None
    try:
        with engine.connect() as conn:
            info = load_run_info(conn, run_id)
            metadata = export_metadata(conn, info)
            chunks = iter_prediction_rows(conn, info)
            rows = (_write_parquet(partial, chunks, metadata) if format == "parquet"
                    else _write_csv(partial, chunks))
        if partial_sidecar is not None and sidecar is not None:
            partial_sidecar.write_text(json.dumps({EXPORT_METADATA_KEY: metadata}, indent=2, sort_keys=True,
                                                  default=str) + "\n", encoding="utf-8")
            partial_sidecar.replace(sidecar)
        partial.replace(path)
    except OSError as exc:
        raise InputError("--output", path, f"cannot write ({exc.strerror or exc})") from exc
    finally:
        partial.unlink(missing_ok=True)
        if partial_sidecar is not None:
            partial_sidecar.unlink(missing_ok=True)
    payload: dict[str, Any] = {"run_id": run_id, "path": str(path), "format": format, "rows": rows}
    if sidecar is not None:
        payload["provenance_path"] = str(sidecar)
    return payload


def provenance_path(path: Path) -> Path:
    """Where a CSV export's provenance goes: beside it, its whole name plus `.provenance.json`."""
    return path.with_name(f"{path.name}.provenance.json")


def _check_output(path: Path) -> None:
    """An export goes to a file in an existing, writable folder; no folder is created."""
    if path.is_dir():
        raise InputError("--output", path, "is a folder; give a file name")
    if not path.parent.is_dir():
        raise InputError("--output", path, f"the folder {path.parent} does not exist (it is not created)")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError("--output", path, "is not writable")


EXPORT_METADATA_KEY = "difftpt"  # the Parquet file's key-value metadata: which run, spec and provenance


def export_metadata(conn: Connection, info: RunInfo) -> dict[str, Any]:
    """What identifies an exported run's rows, stored in the Parquet file itself (a file copied away from the
    workspace, or MLflow's predictions.parquet, still says which run, model, seed and code made it): the run's
    columns, spec and provenance, and the distinct provenance of the machines its shards ran on (device,
    precision, activation, weights)."""
    from difftpt_ops.db.tables import Shard

    run = info.run
    machines = {json.dumps(facts, sort_keys=True, default=str) for (facts,) in conn.execute(
        select(Shard.provenance).where(Shard.run_id == run.id, Shard.provenance.is_not(None)))}
    return {"run_id": run.id, "method": run.method, "state": run.state, "dataset": info.dataset,
            "dataset_version": info.dataset_version, "num_samples": run.num_samples, "model": run.model_name,
            "pretrained": run.pretrained, "seed": run.seed, "device": run.device, "precision": run.precision,
            "settings": run.settings, "fingerprint": run.fingerprint, "spec": run.spec,
            "provenance": run.provenance, "shard_provenance": [json.loads(m) for m in sorted(machines)],
            "mlflow_run_id": run.mlflow_run_id}


def _parquet_schema(metadata: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    i64, f64, b, s = pa.int64(), pa.float64(), pa.bool_(), pa.string()
    types = {"sample_id": i64, "sample_index": i64, "relpath": s, "label": i64, "label_name": s, "pred": i64,
             "pred_name": s, "top5": pa.list_(i64), "correct": b, "top5_correct": b, "zeroshot_pred": i64,
             "zeroshot_correct": b, "confidence_before": f64, "confidence_after": f64, "entropy_before": f64,
             "entropy_after": f64, "n_views": i64, "n_kept": i64, "seconds": f64, "worker": s}
    meta = {EXPORT_METADATA_KEY: json.dumps(metadata, sort_keys=True, default=str)} if metadata is not None else None
    return pa.schema([(name, types[name]) for name in EXPORT_COLUMNS], metadata=meta)


def _write_parquet(path: Path, chunks: Iterator[list[dict[str, Any]]], metadata: dict[str, Any] | None = None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, rows = _parquet_schema(metadata), 0
    with pq.ParquetWriter(str(path), schema) as writer:
        for chunk in chunks:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            rows += len(chunk)
        if rows == 0:  # an empty run still gets a readable file with the columns
            writer.write_table(schema.empty_table())
    return rows


def _write_csv(path: Path, chunks: Iterator[list[dict[str, Any]]]) -> int:
    rows = 0
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(EXPORT_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for chunk in chunks:
            for row in chunk:
                writer.writerow({**row, "top5": json.dumps(row["top5"])})
            rows += len(chunk)
    return rows


def write_run_artifacts(engine: Engine, artifact_root: Path, info: RunInfo, summary: dict[str, Any],
                        directory: Path) -> list[str]:
    """predictions.parquet, per_class.csv, reliability.png, per_class_gain.png (+ view_grid.png for DiffTPT)."""
    from difftpt_ops.tracking import plots

    title = f"run {info.run.id} ({info.run.method}) on {info.dataset}@v{info.dataset_version}"
    export_run(engine, info.run.id, directory / "predictions.parquet", "parquet")
    classes = summary.get("classes", [])
    with (directory / "per_class.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "name", "n", "correct", "top1", "zeroshot_top1", "gain"])
        writer.writeheader()
        writer.writerows(classes)
    with engine.connect() as conn:
        bins = [{"count": b.count, "accuracy": b.accuracy, "mean_confidence": b.mean_confidence}
                for b in calibration_bins(conn, info.run.id)]
        grid = view_grid_data(conn, info) if info.run.method == "difftpt" else []
    plots.reliability_diagram(bins, summary.get("ece"), directory / "reliability.png", title)
    plots.per_class_gain(classes, directory / "per_class_gain.png", title)
    names = ["predictions.parquet", "per_class.csv", "reliability.png", "per_class_gain.png"]
    if grid:
        plots.view_grid(_grid_rows(artifact_root, info, grid), directory / "view_grid.png", title)
        names.append("view_grid.png")
    return names


def _grid_rows(artifact_root: Path, info: RunInfo, grid: list[dict[str, Any]]) -> list[Any]:
    from difftpt_ops.tracking.plots import GridRow, GridVariant

    def name(label: int) -> str:
        return info.class_names[label] if 0 <= label < len(info.class_names) else str(label)

    return [GridRow(
        image=Path(info.dataset_root) / item["relpath"],
        caption=f"{name(item['label'])}\npred {name(item['pred'])} ({'right' if item['correct'] else 'wrong'})",
        variants=[GridVariant(_artifact_path(artifact_root, v["artifact_key"]), v["cosine"], v["kept"])
                  for v in item["variants"]]) for item in grid]


def _artifact_path(artifact_root: Path, key: str) -> Path | None:
    """Where the artifact store keeps `key`; None for a key it would not accept (drawn as missing)."""
    from difftpt_ops.storage.artifacts import ArtifactStore

    try:
        return ArtifactStore(artifact_root).path(key)
    except ValueError:
        return None
