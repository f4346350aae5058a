"""The embedded executor with the real engine and generator on tiny models: generate, then DiffTPT reads
the generated images; model loading is cached per process."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from difftpt_ops.core.errors import InputError
from difftpt_ops.core.specs import GenerationSpec
from difftpt_ops.db.tables import Prediction, ViewScore
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.running import contexts, processors, runs
from tests.integration.test_jobs_support import (
    add_dataset,
    count,
    distinct_predictions,
    error_rows,
    make_settings,
    open_engine,
    run_state,
)

pytestmark = pytest.mark.integration


def _images(root: Path, n: int) -> list[str]:
    relpaths = []
    for i in range(n):
        relpath = f"class{i % 2}/{i}.png"
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), ((i * 70) % 256, (i * 30) % 256, 200)).save(root / relpath)
        relpaths.append(relpath)
    return relpaths


def test_generate_then_difftpt_on_tiny_models(workspace: Path, tmp_path: Path, tiny_models_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation run makes the images once; a DiffTPT run finds and uses them; a missing file is a sample error."""
    monkeypatch.setattr(reporting, "report_progress", lambda *_: None)
    monkeypatch.setattr(reporting, "report_finished", lambda *_: None)
    monkeypatch.setattr(reporting, "_next_report", {})
    contexts.clear_caches()
    settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 4, root=root, classes=2, relpaths=_images(root, 4))
    clip = str(tiny_models_dir / "clip")
    with pytest.raises(InputError, match="submit generate --dataset pics"):
        runs.submit_tune(engine, settings, dataset_ref="pics", method="difftpt", model=clip, pretrained=None)

    spec = GenerationSpec(model=str(tiny_models_dir / "sd-image-variations"), revision=None, steps=2, size=64,
                          per_sample=2)
    generated = runs.submit_generate(engine, settings, dataset_ref="pics", spec=spec, batch_size=2)
    assert (generated.kind, generated.state) == ("generate", "finished")
    again = runs.submit_generate(engine, settings, dataset_ref="pics", spec=spec, batch_size=2)
    assert (again.run_id, again.created, again.shards_dispatched) == (generated.run_id, False, 0)

    (root / "class1/3.png").unlink()  # gone after registration: a sample error, the shard goes on
    with pytest.raises(InputError, match="n_generated=63: exceeds the 2 images per sample"):
        runs.submit_tune(engine, settings, dataset_ref="pics", method="difftpt", model=clip, pretrained=None)
    overrides = {"n_conventional": "3", "steps": "1", "n_generated": "2"}
    tuned = runs.submit_tune(engine, settings, dataset_ref="pics", method="difftpt", model=clip, pretrained=None,
                             overrides=overrides)
    assert tuned.generation_config_id == generated.generation_config_id
    assert run_state(engine, tuned.run_id) == "finished_with_failures"
    assert count(engine, Prediction, tuned.run_id) == distinct_predictions(engine, tuned.run_id) == 3
    assert count(engine, ViewScore, tuned.run_id) == 3 * (1 + 3 + 2)  # original + conventional + generated
    with engine.connect() as conn:
        used = conn.execute(select(Prediction.n_generated).where(Prediction.run_id == tuned.run_id)).scalars().all()
    assert used == [2, 2, 2]  # every row used exactly the spec's generated views
    assert [e.sample_index for e in error_rows(engine, tuned.run_id)] == [3]

    zeroshot = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=clip, pretrained=None)
    assert zeroshot.state == "finished_with_failures" and count(engine, Prediction, zeroshot.run_id) == 3
    clips = [key for key in processors.MODELS._items if key[0] == "clip"]
    assert len(clips) == 1  # one CLIP load served both runs
