"""Disk a run's stored files take: the generated images it made or reads (sizes read from the store)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from difftpt_ops.config import Settings
from difftpt_ops.db.tables import GeneratedImage, Run, Sample
from difftpt_ops.storage.artifacts import ArtifactStore


def run_disk_usage(engine: Engine, settings: Settings, run_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Per run: {"images": count, "image_bytes": bytes on disk} for the images of its samples.

    A generation run counts the images it made; a DiffTPT run the images it reads; other runs none.
    Images shared by runs count for each of them. Files missing from the store count as 0 bytes.
    """
    store = ArtifactStore(settings.artifact_root)
    usage: dict[int, dict[str, Any]] = {}
    with Session(engine) as session:
        for run in session.scalars(select(Run).where(Run.id.in_(run_ids))):
            keys = _image_keys(session, run)
            usage[run.id] = {"images": len(keys), "image_bytes": sum(_size(store, key) for key in keys)}
    return usage


def _image_keys(session: Session, run: Run) -> list[str]:
    if run.generation_config_id is None:
        return []
    sources = select(Sample.content_hash).where(Sample.dataset_version_id == run.dataset_version_id,
                                                Sample.index < run.num_samples)
    return list(session.scalars(select(GeneratedImage.artifact_key).where(
        GeneratedImage.generation_config_id == run.generation_config_id,
        GeneratedImage.source_hash.in_(sources))))


def _size(store: ArtifactStore, key: str) -> int:
    try:
        return store.path(key).stat().st_size
    except (OSError, ValueError):  # deleted by hand, or a key the store does not accept
        return 0
