"""Scanning a dataset layout: probe every file, spool the rows to disk, fingerprint the content.

A scan never holds more than one batch of rows (and one file's bytes per thread) in memory: rows go
to a spool file as JSON lines, so the database is written only once the whole split is known good
to write (idempotence and conflicts are decided before the first INSERT).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Any

from difftpt_ops.core.specs import canonical_json
from difftpt_ops.data.layouts import OUTSIDE_HINT, DatasetLayout, Entry, FailedEntry, is_inside
from difftpt_ops.data.probe import FileProbe, probe_file

BATCH_ROWS = 1000
FINGERPRINT_SCHEMA = 1
MAX_REPORTED_FAILURES = 20
_PROGRESS_EVERY = 50  # files between progress callbacks
ProgressFn = Callable[[int, int], None]  # (files done, files in total)
_ROW_FIELDS = ("index", "relpath", "label", "content_hash", "status", "error", "width", "height")


class VersionDigest:
    """sha256 over a header (format, class names, subset rule) and the ordered (relpath, label, hash)."""

    def __init__(self, header: dict[str, Any]) -> None:
        self._sha = hashlib.sha256(canonical_json({"schema": FINGERPRINT_SCHEMA, **header}).encode())

    def add(self, relpath: str, label: int, content_hash: str | None) -> None:
        self._sha.update(b"\n" + canonical_json([relpath, label, content_hash]).encode())

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def full_version_header(fmt: str, class_names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """What besides the samples identifies a full split: its format and class names in label order."""
    return {"format": fmt, "class_names": list(class_names)}


@dataclass
class ScanSummary:
    """Counts and fingerprint of a scanned split; `failures` holds the first few failed files."""

    fingerprint: str
    num_samples: int = 0
    num_failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_ok(self) -> int:
        return self.num_samples - self.num_failed


def _row(index: int, entry: Entry, probe: FileProbe) -> list[Any]:
    status = "ok" if probe.ok else "failed"
    return [index, entry.relpath, entry.label, probe.content_hash, status, probe.error, probe.width, probe.height]


def _batches(entries: Iterator[Entry], size: int) -> Iterator[list[Entry]]:
    while batch := list(islice(entries, size)):
        yield batch


def scan_layout(layout: DatasetLayout, spool: IO[str], *, progress: ProgressFn | None = None,
                workers: int | None = None) -> ScanSummary:
    """Probe every entry of `layout` (threads: hashing and decoding release the GIL) into `spool`."""
    total = layout.count()
    digest = VersionDigest(full_version_header(layout.format, layout.class_names))
    summary = ScanSummary(fingerprint="")
    workers = workers or min(8, os.cpu_count() or 1)
    if progress is not None:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in _batches(iter(layout), BATCH_ROWS):
            probes = pool.map(functools.partial(probe_entry, layout), batch)
            for entry, probe in zip(batch, probes, strict=True):
                _record(summary, digest, spool, entry, probe)
                if progress is not None and summary.num_samples % _PROGRESS_EVERY == 0:
                    progress(summary.num_samples, total)
    if progress is not None:
        progress(summary.num_samples, total)
    summary.fingerprint = digest.hexdigest()
    spool.flush()
    return summary


def probe_entry(layout: DatasetLayout, entry: Entry) -> FileProbe:
    """Probe one entry's file, unless the listing already failed it or it leads outside the root."""
    if isinstance(entry, FailedEntry):
        return FileProbe(None, None, None, entry.error)
    path = layout.root / entry.relpath
    if not layout.follow_outside_links and not is_inside(path, layout.root):
        return FileProbe(None, None, None, f"symbolic link leading outside the dataset root (to {path.resolve()}); "
                                           f"{OUTSIDE_HINT}")
    return probe_file(path)


def _record(summary: ScanSummary, digest: VersionDigest, spool: IO[str], entry: Entry, probe: FileProbe) -> None:
    row = _row(summary.num_samples, entry, probe)
    spool.write(json.dumps(row) + "\n")
    digest.add(entry.relpath, entry.label, probe.content_hash)
    summary.num_samples += 1
    if not probe.ok:
        summary.num_failed += 1
        if len(summary.failures) < MAX_REPORTED_FAILURES:
            summary.failures.append({"index": row[0], "relpath": entry.relpath, "label": entry.label,
                                     "error": probe.error})


def read_spool(spool: IO[str], batch_rows: int = BATCH_ROWS) -> Iterator[list[dict[str, Any]]]:
    """The spooled rows again, from the start, as sample dicts in batches."""
    spool.seek(0)
    rows = (dict(zip(_ROW_FIELDS, json.loads(line), strict=True)) for line in spool)
    while batch := list(islice(rows, batch_rows)):
        yield batch
