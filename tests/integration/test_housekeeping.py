"""Temporary files that writers killed mid-write left in the artifact root are removed once they are stale:
by the first embedded run of a process and by `worker`'s start, never while they may belong to a live writer."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from difftpt_ops.services.running import runs
from difftpt_ops.services.workspace import STALE_TEMP_AFTER_S, remove_stale_temporaries
from difftpt_ops.storage.artifacts import TEMP_SUFFIX
from tests.integration.test_jobs_support import add_dataset, make_settings, open_engine, quiet_run_machinery

pytestmark = pytest.mark.integration

NAMESPACES = ("generated", "features", "online", "descriptions")


def _leftovers(root: Path, *, age_s: float) -> list[Path]:
    """One temporary file per namespace, as a killed writer leaves it, last written `age_s` ago; and a published
    file beside it, which must never go."""
    paths = []
    for namespace in NAMESPACES:
        folder = root / namespace / "ab"
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".ab{namespace}.{os.getpid()}.{int(age_s)}{TEMP_SUFFIX}"
        temp.write_bytes(b"half written")
        os.utime(temp, (time.time() - age_s, time.time() - age_s))
        published = folder / ("ab" + "0" * 62 + ".png")
        published.write_bytes(b"complete")
        os.utime(published, (time.time() - 10 * STALE_TEMP_AFTER_S,) * 2)
        paths.append(temp)
    return paths


def test_only_stale_temporary_files_are_removed(workspace: Path, database_url: str) -> None:
    settings = make_settings(workspace, database_url)
    stale = _leftovers(settings.artifact_root, age_s=2 * STALE_TEMP_AFTER_S)
    fresh = _leftovers(settings.artifact_root, age_s=60)  # a writer may still be writing these
    assert remove_stale_temporaries(settings) == len(NAMESPACES)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in fresh)
    assert len(list(settings.artifact_root.glob("*/ab/*.png"))) == len(NAMESPACES)
    assert remove_stale_temporaries(settings) == 0


def test_an_embedded_run_clears_them_at_its_start(workspace: Path, database_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_run_machinery(monkeypatch)
    settings = make_settings(workspace, database_url, mlflow_tracking_uri="none")
    engine = open_engine(settings)
    add_dataset(engine, "toy", 4)
    stale = _leftovers(settings.artifact_root, age_s=2 * STALE_TEMP_AFTER_S)
    result = runs.submit_tune(engine, settings, dataset_ref="toy", method="noop")
    assert result.state == "finished" and not any(p.exists() for p in stale)
    # Once per process and root: the next run of this process (a sweep's next point) does not list it again.
    later = _leftovers(settings.artifact_root, age_s=3 * STALE_TEMP_AFTER_S)
    assert runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", limit=2).state == "finished"
    assert all(p.exists() for p in later)
