"""Checking a registered dataset version against its files: are they still the bytes that were registered?

Runs, views, generated images and stored features are keyed by each sample's registered content hash, so a run
refuses (as a failed sample) a file whose bytes changed. `verify_dataset` finds such files for a whole version
before a run does: every sample registered as readable is hashed again and compared.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from difftpt_ops.data.images import hash_file
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Sample
from difftpt_ops.services.datasets import resolve_dataset_version

ProgressFn = Callable[[int, int], None]
_MAX_THREADS = 8  # hashing releases the GIL; threads overlap the reads of network or spinning storage
_PROGRESS_EVERY = 256


def verify_dataset(engine: Engine, ref: str, *, max_listed: int = 100, progress: ProgressFn | None = None
                   ) -> dict[str, Any]:
    """Hash again every file of dataset version `ref` ("NAME" or "NAME@V") registered as a readable sample.

    Returns a report: `checked`, `unchanged`, `changed` (other bytes), `missing` (no file), `unreadable` (the file
    exists but cannot be read), and `problems`, the first `max_listed` of them in sample order (index, relpath,
    problem, and the registered and found hashes where they differ). Samples registered as failed are not checked:
    runs skip them.

    Raises:
        NotFoundError: no such dataset or version.
    """
    with session_scope(engine) as session:
        dataset, version = resolve_dataset_version(session, ref)
        name, number, root = dataset.name, version.version, Path(dataset.root)
        samples = session.execute(select(Sample.index, Sample.relpath, Sample.content_hash).where(
            Sample.dataset_version_id == version.id, Sample.status == "ok").order_by(Sample.index)).all()
    counts = {"unchanged": 0, "changed": 0, "missing": 0, "unreadable": 0}
    problems: list[dict[str, Any]] = []
    for done, (sample, found) in enumerate(_hashes(root, samples), start=1):
        kind = _compare(sample.content_hash, found)
        counts[kind] += 1
        if kind != "unchanged" and len(problems) < max_listed:
            problems.append({"index": sample.index, "relpath": sample.relpath, "problem": kind,
                             "registered": sample.content_hash, "found": found if kind == "changed" else None})
        if progress is not None and (done % _PROGRESS_EVERY == 0 or done == len(samples)):
            progress(done, len(samples))
    return {"name": name, "version": number, "root": str(root), "checked": len(samples), **counts,
            "problems": problems}


def _compare(registered: str | None, found: str) -> str:
    if found in ("missing", "unreadable"):
        return found
    return "unchanged" if found == registered else "changed"


def _hashes(root: Path, samples: Iterable[Any]) -> Iterator[tuple[Any, str]]:
    """(sample, its file's sha256 or "missing" or "unreadable"), in the order of `samples`."""
    def digest(sample: Any) -> tuple[Any, str]:
        try:
            return sample, hash_file(root / sample.relpath)
        except FileNotFoundError:
            return sample, "missing"
        except OSError:
            return sample, "unreadable"

    with ThreadPoolExecutor(max_workers=min(_MAX_THREADS, os.cpu_count() or 1)) as pool:
        yield from pool.map(digest, samples)
