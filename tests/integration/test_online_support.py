"""Helpers for the online-run tests (no tests here): an image dataset, settings, and what a run stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import select
from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Prediction
from difftpt_ops.services.running import checkpoints
from tests.integration.test_jobs_support import add_dataset, make_settings, open_engine

N_SAMPLES = 18
SHARD_SIZE = 4
OVERRIDES = {"n_views": "3"}  # a few augmented views keep the tiny runs quick and still exercise selection


def image_dataset(engine: Engine, root: Path, name: str = "pics", n: int = N_SAMPLES) -> None:
    """`n` small distinct PNGs in 3 class folders, registered as rows."""
    relpaths = []
    for i in range(n):
        relpath = f"class{i % 3}/{i}.png"
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), ((i * 70) % 256, (i * 30) % 256, (i * 110) % 256)).save(root / relpath)
        relpaths.append(relpath)
    add_dataset(engine, name, n, root=root, classes=3, relpaths=relpaths)


def online_settings(workspace: Path, database_url: str, **extra: str) -> tuple[Settings, Engine]:
    settings = make_settings(workspace, database_url, device="cpu", mlflow_tracking_uri="none", **extra)
    return settings, open_engine(settings)


def cli_workspace(workspace: Path, images: Path, monkeypatch: Any, n: int = 4) -> tuple[Settings, Engine]:
    """An embedded SQLite workspace with an `n`-image dataset `pics`, which the CLI finds through the environment
    (`monkeypatch`: pytest's, which undoes it)."""
    database = f"sqlite:///{workspace / 'difftpt.db'}"
    settings, engine = online_settings(workspace, database)
    image_dataset(engine, images, n=n)
    for key, value in {"DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": database,
                       "DIFFTPT_OPS_DEVICE": "cpu", "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none"}.items():
        monkeypatch.setenv(key, value)
    return settings, engine


def predictions(engine: Engine, run_id: int) -> dict[int, tuple[int, float | None]]:
    """sample index -> (predicted class, confidence after) of a run."""
    with session_scope(engine) as session:
        rows = session.execute(select(Prediction.sample_index, Prediction.pred, Prediction.confidence_after)
                               .where(Prediction.run_id == run_id)).all()
    return {row.sample_index: (row.pred, row.confidence_after) for row in rows}


def stored_logits(engine: Engine, settings: Settings, run_id: int) -> dict[int, Any]:
    """stream position -> prediction logits, from the run's (intact) checkpoint files."""
    found: dict[int, Any] = {}
    for index, data in checkpoints.shard_checkpoints(engine, settings, run_id):
        assert data is not None, f"checkpoint of shard {index} is damaged"
        _, logits, positions = checkpoints.decode_checkpoint(data)
        found.update({int(p): row for p, row in zip(positions.tolist(), logits, strict=True)})
    return found


def assert_same_run(engine: Engine, settings: Settings, run_id: int, ref_engine: Engine, ref_settings: Settings,
                    ref_run: int) -> None:
    """Same prediction per sample and logits within 1e-6 at every stream position."""
    import torch

    got, want = predictions(engine, run_id), predictions(ref_engine, ref_run)
    assert sorted(got) == sorted(want) == list(range(len(want)))
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    logits, ref_logits = stored_logits(engine, settings, run_id), stored_logits(ref_engine, ref_settings, ref_run)
    assert sorted(logits) == sorted(ref_logits) == list(range(len(want)))
    for position, row in ref_logits.items():
        torch.testing.assert_close(logits[position], row, rtol=0, atol=1e-6)
