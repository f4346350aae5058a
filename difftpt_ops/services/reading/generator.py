"""What generated the images a run used: the generation config's settings, and how many of its images were
made here and how many imported (`data import-generated`: made elsewhere, stored with the settings given)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from difftpt_ops.db.tables import GeneratedImage, GenerationConfig, Run, Sample


def generator_facts(session: Session, run: Run | Any) -> dict[str, Any] | None:
    """{config_id, settings, images_made, images_imported} over the images stored under the run's generation
    config for its dataset version's samples; None for a run without one (every method but DiffTPT)."""
    if run.generation_config_id is None:
        return None
    config = session.get(GenerationConfig, run.generation_config_id)
    hashes = select(Sample.content_hash).where(Sample.dataset_version_id == run.dataset_version_id)
    counts = dict(session.execute(
        select(GeneratedImage.imported, func.count()).where(
            GeneratedImage.generation_config_id == run.generation_config_id,
            GeneratedImage.source_hash.in_(hashes)).group_by(GeneratedImage.imported)).all())
    return {"config_id": run.generation_config_id, "settings": config.spec if config is not None else None,
            "images_made": int(counts.get(False, 0)), "images_imported": int(counts.get(True, 0))}


def generator_params(facts: dict[str, Any] | None) -> dict[str, Any]:
    """The generator's settings as MLflow params (`generator.steps`, ...): fixed for a config, so they never
    change under a run."""
    settings = (facts or {}).get("settings") or {}
    return {f"generator.{key}": value for key, value in sorted(settings.items())}
