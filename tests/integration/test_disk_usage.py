"""`status` disk use: a run's generated images (bytes on disk) and the view features of its samples and model."""

from __future__ import annotations

from pathlib import Path

import pytest

from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import ViewFeatures
from difftpt_ops.services.reading.disk import run_disk_usage
from difftpt_ops.storage.artifacts import ArtifactStore
from tests.factories import make_dataset_version, make_generated_images, make_generation_config, make_run, samples_of
from tests.integration.test_jobs_support import make_settings, open_engine

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_images_and_features_of_a_run(workspace: Path, database_url: str) -> None:
    """Images of the run's samples under its config, with file sizes; features of its samples under its model."""
    settings = make_settings(workspace, database_url, mlflow_tracking_uri="none")
    engine = open_engine(settings)
    store = ArtifactStore(settings.artifact_root)
    with session_scope(engine) as session:
        version = make_dataset_version(session, n_samples=4)
        samples = samples_of(session, version)
        config = make_generation_config(session)
        images = [img for sample in samples[:3] for img in make_generated_images(session, config, sample, 2)]
        for i, image in enumerate(images[:-1]):  # the last file is missing from the store: 0 bytes
            store.put(image.artifact_key, b"x" * (100 + i))
        difftpt = make_run(session, version, method="difftpt", generation_config_id=config.id, model_name="tiny")
        zeroshot = make_run(session, version, method="zeroshot", model_name="other")
        for sample, size in zip(samples[:2], (1000, 2000), strict=True):
            session.add(ViewFeatures(model_fingerprint="m" * 64, sample_hash=sample.content_hash,
                                     recipe_fingerprint="r" * 64, views=[], n_views=1, dim=4, dtype="float32",
                                     artifact_key=f"{'f' * 64}.st", content_hash="c" * 64, size_bytes=size,
                                     model_name="tiny"))
        ids = (difftpt.id, zeroshot.id)
    usage = run_disk_usage(engine, settings, list(ids))
    assert usage[ids[0]] == {"images": 6, "image_bytes": sum(100 + i for i in range(5)), "features": 2,
                             "feature_bytes": 3000}
    assert usage[ids[1]] == {"images": 0, "image_bytes": 0, "features": 0, "feature_bytes": 0}
    engine.dispose()


def test_features_of_an_online_run_with_a_limit_are_those_of_its_stream(workspace: Path, database_url: str) -> None:
    """An online run's `--limit N` takes the first N positions of its seeded stream, not the first N by index:
    `status` counts the features of those samples (QA: `submit tune --method ecalp --limit 10` stored 10 sets,
    `status` said "4 features")."""
    from difftpt_ops.core.run_specs import stream_order

    settings = make_settings(workspace, database_url, mlflow_tracking_uri="none")
    engine = open_engine(settings)
    n, limit = 12, 5
    order = stream_order(n, 0)
    assert sorted(order[:limit]) != list(range(limit))  # the case in question: other samples than the first 5
    with session_scope(engine) as session:
        version = make_dataset_version(session, n_samples=n)
        samples = samples_of(session, version)
        spec = {"kind": "tune", "method": {"method": "ecalp", "order_seed": 0}, "model": {"name": "tiny"},
                "seed": 0}
        run = make_run(session, version, method="ecalp", spec=spec, model_name="tiny", num_samples=limit)
        for index in order[:limit]:  # what the run stored: the original view of each sample it processed
            session.add(ViewFeatures(model_fingerprint="m" * 64, sample_hash=samples[index].content_hash,
                                     recipe_fingerprint="r" * 64, views=[], n_views=1, dim=4, dtype="float32",
                                     artifact_key=f"{'f' * 64}.st", content_hash="c" * 64, size_bytes=100,
                                     model_name="tiny"))
        run_id = run.id
    usage = run_disk_usage(engine, settings, [run_id])
    assert usage[run_id]["features"] == limit
    assert usage[run_id]["feature_bytes"] == 100 * limit
    engine.dispose()
