"""The dataset registry: register a test split, make seeded subsets, resolve and describe versions.

Version 1 of a dataset is its full test split; a subset is a later version whose parent is version 1.
Registration validates everything it can before reading a file, scans the files into a spool (no
database write), decides idempotence or conflict from the content fingerprint, and only then writes
the dataset, its version(s) and samples in one transaction: any error leaves nothing behind.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from difftpt_ops.core.errors import ConflictError, InputError, NotFoundError
from difftpt_ops.data.formats import is_cross_domain, open_layout
from difftpt_ops.data.layouts import DatasetLayout
from difftpt_ops.data.scan import BATCH_ROWS, ProgressFn, ScanSummary, VersionDigest, read_spool, scan_layout
from difftpt_ops.data.subsets import SUBSET_RULE, check_subset_args, select_subset
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Dataset, DatasetVersion, Sample
from difftpt_ops.db.writes import insert_ignore

MAX_NAME_LENGTH = 200
_COPIED_FIELDS = ("relpath", "label", "content_hash", "status", "error", "width", "height")


def _check_name(name: str) -> None:
    if not name or name != name.strip() or len(name) > MAX_NAME_LENGTH:
        raise InputError("NAME", repr(name), f"must be 1..{MAX_NAME_LENGTH} characters without surrounding spaces")
    if "@" in name:
        raise InputError("NAME", name, "must not contain '@' (NAME@V names a version)")


def _conflict(dataset: Dataset, problem: str) -> ConflictError:
    return ConflictError("NAME", dataset.name, f"is already registered with other content ({problem}; "
                         f"registered: format {dataset.format}, root {dataset.root}); choose another name")


def _precheck_existing(engine: Engine, name: str, layout: DatasetLayout) -> None:
    """Fail before the scan when the stored dataset of that name cannot match (other format or classes)."""
    with session_scope(engine) as session:
        dataset = session.scalar(select(Dataset).where(Dataset.name == name))
        if dataset is None:
            return
        if dataset.format != layout.format:
            raise _conflict(dataset, f"format {layout.format}")
        if list(dataset.class_names) != list(layout.class_names):
            raise _conflict(dataset, "other class names")


def register_dataset(engine: Engine, *, name: str, root: Path | str, format: str = "auto",  # noqa: A002
                     class_names_file: Path | str | None = None, split_file: Path | str | None = None,
                     subset: int | None = None, seed: int = 0, progress: ProgressFn | None = None,
                     follow_outside_links: bool = False) -> dict[str, Any]:
    """Register the test split at `root` as dataset `name` (version 1), and optionally a seeded subset.

    Links leading outside `root` are followed only with `follow_outside_links` (else they are failed
    samples); ImageFolder folders without images are not classes and are listed in `empty_folders`.

    Returns a report: status "registered" or "already registered", counts, fingerprint, first failures,
    and `subset` (the subset version's report) when `subset` is given.

    Raises:
        NotFoundError: the root or a named file does not exist.
        InputError: unknown format, bad class-name or split file, bad subset arguments, no images.
        ConflictError: `name` is registered with other content.
    """
    # 1. Validate everything that needs no file content.
    _check_name(name)
    layout = open_layout(root, format, class_names_file=class_names_file, split_file=split_file,
                         follow_outside_links=follow_outside_links)
    if subset is not None:
        check_subset_args(subset, seed)
    _precheck_existing(engine, name, layout)
    # 2. Scan every file into a spool; the database is untouched so far.
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        scan = scan_layout(layout, spool, progress=progress)
        if scan.num_samples == 0:
            raise InputError("--root", layout.root, f"no image files found for format {layout.format}")
        if subset is not None:
            check_subset_args(subset, seed, scan.num_ok)
        # 3. Write in one transaction (or find the same content already there).
        with session_scope(engine) as session:
            report = _store_full(session, name, layout, scan, spool)
            report["empty_folders"] = list(layout.empty_folders)
            if subset is not None:
                dataset = session.get(Dataset, report["dataset_id"])
                full = session.get(DatasetVersion, report["dataset_version_id"])
                assert dataset is not None and full is not None
                report["subset"] = _ensure_subset(session, dataset, full, subset, seed)
    return report


def _store_full(session: Session, name: str, layout: DatasetLayout, scan: ScanSummary, spool: Any) -> dict[str, Any]:
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is not None:
        full = _full_version(session, dataset)
        if full.fingerprint != scan.fingerprint:
            raise _conflict(dataset, f"{scan.num_samples} samples with fingerprint {scan.fingerprint[:12]}")
        return _full_report(dataset, full, "already registered", [])
    dataset = Dataset(name=name, format=layout.format, root=str(layout.root), class_names=list(layout.class_names))
    full = DatasetVersion(version=1, fingerprint=scan.fingerprint, num_samples=scan.num_samples,
                          num_failed=scan.num_failed)
    try:
        session.add(dataset)
        session.flush()
        full.dataset_id = dataset.id
        session.add(full)
        session.flush()
    except IntegrityError as exc:
        raise ConflictError("NAME", name, "was registered by another process meanwhile; run again") from exc
    for batch in read_spool(spool):
        insert_ignore(session, Sample, [{**row, "dataset_version_id": full.id} for row in batch])
    return _full_report(dataset, full, "registered", scan.failures)


def _full_report(dataset: Dataset, full: DatasetVersion, status: str, failures: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    return {
        "status": status, "name": dataset.name, "format": dataset.format, "root": dataset.root,
        "num_classes": len(dataset.class_names), "dataset_id": dataset.id, "version": full.version,
        "dataset_version_id": full.id, "fingerprint": full.fingerprint, "num_samples": full.num_samples,
        "num_ok": full.num_samples - full.num_failed, "num_failed": full.num_failed, "failures": failures,
        "cross_domain": is_cross_domain(dataset.format),
    }


def _full_version(session: Session, dataset: Dataset) -> DatasetVersion:
    full = session.scalar(select(DatasetVersion).where(
        DatasetVersion.dataset_id == dataset.id, DatasetVersion.parent_version_id.is_(None),
    ).order_by(DatasetVersion.version).limit(1))
    if full is None:
        raise NotFoundError("--dataset", dataset.name, "has no full version; register it again under a new name")
    return full


def create_subset(engine: Engine, *, name: str, size: int, seed: int = 0) -> dict[str, Any]:
    """Make (or find) the seeded, class-stratified subset of `size` samples of dataset `name`'s full split.

    Raises:
        NotFoundError: no dataset `name`.
        InputError: `size` < 1 or more than the dataset's readable samples; a seed out of range.
    """
    check_subset_args(size, seed)
    with session_scope(engine) as session:
        dataset, _ = resolve_dataset_version(session, name)
        return _ensure_subset(session, dataset, _full_version(session, dataset), size, seed)


def _ensure_subset(session: Session, dataset: Dataset, full: DatasetVersion, size: int, seed: int) -> dict[str, Any]:
    existing = session.scalar(select(DatasetVersion).where(
        DatasetVersion.parent_version_id == full.id, DatasetVersion.subset_size == size,
        DatasetVersion.subset_seed == seed))
    if existing is not None:
        return _subset_report(existing, "reused")
    check_subset_args(size, seed, full.num_samples - full.num_failed)
    pairs = session.execute(select(Sample.index, Sample.label).where(
        Sample.dataset_version_id == full.id, Sample.status == "ok").order_by(Sample.index)).tuples()
    chosen = select_subset(pairs, size, seed)
    version = _new_subset_version(session, dataset, full, size, seed)
    digest = VersionDigest({"parent": full.fingerprint, "rule": SUBSET_RULE, "size": size, "seed": seed})
    for start in range(0, len(chosen), BATCH_ROWS):
        rows = _copied_rows(session, full.id, chosen[start:start + BATCH_ROWS], first_index=start)
        for row in rows:
            digest.add(row["relpath"], row["label"], row["content_hash"])
            row["dataset_version_id"] = version.id
        insert_ignore(session, Sample, rows)
    version.fingerprint = digest.hexdigest()
    version.num_samples = len(chosen)
    session.flush()
    return _subset_report(version, "created")


def _new_subset_version(session: Session, dataset: Dataset, full: DatasetVersion, size: int, seed: int
                        ) -> DatasetVersion:
    latest = session.scalar(select(func.max(DatasetVersion.version)).where(DatasetVersion.dataset_id == dataset.id))
    # The fingerprint needs the copied rows; a unique placeholder holds its (NOT NULL, unique) place until then.
    version = DatasetVersion(dataset_id=dataset.id, version=(latest or 0) + 1, fingerprint=uuid.uuid4().hex,
                             parent_version_id=full.id, subset_size=size, subset_seed=seed, num_failed=0)
    try:
        session.add(version)
        session.flush()
    except IntegrityError as exc:
        raise ConflictError("NAME", dataset.name, "another process added a version meanwhile; run again") from exc
    return version


def _copied_rows(session: Session, full_id: int, indices: list[int], *, first_index: int) -> list[dict[str, Any]]:
    """The full version's rows at `indices`, renumbered from `first_index` in the order given."""
    found = {sample.index: sample for sample in session.scalars(select(Sample).where(
        Sample.dataset_version_id == full_id, Sample.index.in_(indices)))}
    return [{"index": first_index + offset, **{f: getattr(found[i], f) for f in _COPIED_FIELDS}}
            for offset, i in enumerate(indices)]


def _subset_report(version: DatasetVersion, status: str) -> dict[str, Any]:
    return {"status": status, "version": version.version, "dataset_version_id": version.id,
            "fingerprint": version.fingerprint, "size": version.subset_size, "seed": version.subset_seed,
            "num_samples": version.num_samples, "rule": SUBSET_RULE}


def parse_ref(ref: str) -> tuple[str, int | None]:
    """"NAME" -> (NAME, None); "NAME@V" -> (NAME, V)."""
    name, at, version = ref.rpartition("@")
    if not at:
        return ref, None
    if not version.isdigit():
        raise InputError("--dataset", ref, "the version after '@' must be a number (NAME@V)")
    return name, int(version)


def resolve_dataset_version(session: Session, ref: str) -> tuple[Dataset, DatasetVersion]:
    """The dataset and version named by `ref`: "NAME" (its latest version) or "NAME@V".

    Raises:
        NotFoundError: no such dataset or version.
    """
    name, number = parse_ref(ref)
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None:
        raise NotFoundError("--dataset", ref, "no such dataset; see `difftpt-ops data list`")
    query = select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id)
    if number is None:
        query = query.order_by(DatasetVersion.version.desc()).limit(1)
    else:
        query = query.where(DatasetVersion.version == number)
    version = session.scalar(query)
    if version is None:
        raise NotFoundError("--dataset", ref, f"no such version; see `difftpt-ops data show {name}`")
    return dataset, version


def list_datasets(engine: Engine) -> list[dict[str, Any]]:
    """One summary per registered dataset: format, root, classes, full-split counts, versions."""
    with session_scope(engine) as session:
        datasets = session.scalars(select(Dataset).order_by(Dataset.name)).all()
        out = []
        for dataset in datasets:
            versions = session.scalars(select(DatasetVersion).where(
                DatasetVersion.dataset_id == dataset.id).order_by(DatasetVersion.version)).all()
            full = next((v for v in versions if v.parent_version_id is None), None)
            out.append({
                "name": dataset.name, "format": dataset.format, "root": dataset.root,
                "num_classes": len(dataset.class_names), "versions": [v.version for v in versions],
                "latest_version": versions[-1].version if versions else None,
                "num_samples": full.num_samples if full else 0, "num_failed": full.num_failed if full else 0,
                "created_at": dataset.created_at.isoformat() if dataset.created_at else None,
            })
        return out


def _version_dict(version: DatasetVersion, numbers: dict[int, int]) -> dict[str, Any]:
    return {
        "version": version.version, "dataset_version_id": version.id, "fingerprint": version.fingerprint,
        "parent_version": numbers.get(version.parent_version_id) if version.parent_version_id else None,
        "subset_size": version.subset_size, "subset_seed": version.subset_seed,
        "num_samples": version.num_samples, "num_failed": version.num_failed,
        "created_at": version.created_at.isoformat() if version.created_at else None,
    }


def _per_class(session: Session, version: DatasetVersion, class_names: list[str]) -> list[dict[str, Any]]:
    counts = {label: {"ok": 0, "failed": 0} for label in range(len(class_names))}
    for label, status, count in session.execute(select(Sample.label, Sample.status, func.count()).where(
            Sample.dataset_version_id == version.id).group_by(Sample.label, Sample.status)).tuples():
        counts.setdefault(label, {"ok": 0, "failed": 0})[status if status == "ok" else "failed"] += count
    return [{"label": label, "name": class_names[label] if label < len(class_names) else None, **c}
            for label, c in sorted(counts.items())]


def _failed_samples(session: Session, version: DatasetVersion, limit: int) -> list[dict[str, Any]]:
    rows = session.execute(select(Sample.index, Sample.relpath, Sample.label, Sample.error).where(
        Sample.dataset_version_id == version.id, Sample.status != "ok").order_by(Sample.index).limit(limit))
    return [{"index": i, "relpath": relpath, "label": label, "error": error} for i, relpath, label, error in rows]


def describe_dataset(engine: Engine, ref: str, *, max_failed: int = 100) -> dict[str, Any]:
    """Everything about dataset version `ref` ("NAME" or "NAME@V"): classes, versions, per-class counts,
    and its failed samples with their reasons (the first `max_failed`; `num_failed` counts them all).

    Raises:
        NotFoundError: no such dataset or version.
    """
    from difftpt_ops.services.reading.store import dataset_store_size

    with session_scope(engine) as session:
        dataset, version = resolve_dataset_version(session, ref)
        versions = session.scalars(select(DatasetVersion).where(
            DatasetVersion.dataset_id == dataset.id).order_by(DatasetVersion.version)).all()
        numbers = {v.id: v.version for v in versions}
        return {
            "name": dataset.name, "format": dataset.format, "root": dataset.root,
            "cross_domain": is_cross_domain(dataset.format), "num_classes": len(dataset.class_names),
            "class_names": list(dataset.class_names), "version": _version_dict(version, numbers),
            "versions": [_version_dict(v, numbers) for v in versions],
            "per_class": _per_class(session, version, list(dataset.class_names)),
            "failed_samples": _failed_samples(session, version, max_failed),
            "feature_store": dataset_store_size(session, version.id),  # stored view features of its samples
        }
