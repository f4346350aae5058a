"""Tuning runs that build the next sample's views in a second thread (DIFFTPT_OPS_VIEWS_AHEAD=on): the same
predictions and view scores as one thread, on SQLite and PostgreSQL, with errors kept with their samples."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from sqlalchemy import select  # noqa: E402

from difftpt_ops.db.session import session_scope  # noqa: E402
from difftpt_ops.db.tables import Prediction, ViewScore  # noqa: E402
from difftpt_ops.db.tables import SampleError as SampleErrorRow  # noqa: E402
from difftpt_ops.services.running import runs  # noqa: E402
from difftpt_ops.services.running.processors import TuneProcessor  # noqa: E402
from tests.integration.test_jobs_support import (  # noqa: E402
    add_dataset,
    make_settings,
    open_engine,
    quiet_run_machinery,
    write_pictures,
)
from tests.unit.tta_support import random_image  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

N = 6
FAILED_AT_REGISTRATION, CHANGED_SINCE = 1, 4
SMALL_TPT = {"n_views": "8", "selection_p": "0.25"}


def _outcome(engine: Any, run_id: int) -> tuple[list[tuple], list[tuple], dict[int, str]]:
    with session_scope(engine) as session:
        predictions = [tuple(r) for r in session.execute(
            select(Prediction.sample_index, Prediction.pred, Prediction.top5, Prediction.zeroshot_pred,
                   Prediction.entropy_after, Prediction.n_kept, Prediction.views_encoded, Prediction.views_read)
            .where(Prediction.run_id == run_id).order_by(Prediction.sample_index))]
        views = [tuple(r) for r in session.execute(
            select(Prediction.sample_index, ViewScore.view_index, ViewScore.entropy, ViewScore.kept)
            .join(Prediction, (Prediction.sample_id == ViewScore.sample_id) & (Prediction.run_id == ViewScore.run_id))
            .where(ViewScore.run_id == run_id).order_by(Prediction.sample_index, ViewScore.view_index))]
        errors = dict(session.execute(select(SampleErrorRow.sample_index, SampleErrorRow.error)
                                      .where(SampleErrorRow.run_id == run_id)).tuples().all())
    return predictions, views, errors


def _threads_preparing(processor: type, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that call `processor.prepare` from now on, in call order."""
    threads: list[str] = []
    prepare = processor.prepare  # type: ignore[attr-defined]

    def recorded(self: Any, sample: Any) -> Any:
        threads.append(threading.current_thread().name)
        return prepare(self, sample)

    monkeypatch.setattr(processor, "prepare", recorded)
    return threads


def _runs(engine: Any, settings: Any, model: str) -> list[tuple]:
    """A TPT run on an empty feature store (views built and stored), then zero-shot reading them back."""
    tpt = runs.submit_tune(engine, settings, dataset_ref="pics", method="tpt", model=model, pretrained=None,
                           overrides=SMALL_TPT)
    zeroshot = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=model,
                                pretrained=None)
    return [_outcome(engine, tpt.run_id), _outcome(engine, zeroshot.run_id)]


def test_views_ahead_gives_the_results_of_one_thread(tiny_models_dir: Path, workspace: Path, tmp_path: Path,
                                                     database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_run_machinery(monkeypatch)
    root = tmp_path / "images"
    relpaths = write_pictures(root, N, seed=40, size=(52, 44))
    ahead = make_settings(workspace, database_url, device="cpu", mlflow_tracking_uri="none", views_ahead="on")
    alone = make_settings(tmp_path / "alone", f"sqlite:///{tmp_path / 'alone.db'}", device="cpu",
                          mlflow_tracking_uri="none", views_ahead="off")
    engines = [open_engine(ahead), open_engine(alone)]
    for engine in engines:
        add_dataset(engine, "pics", N, root=root, classes=2, relpaths=relpaths, failed=[FAILED_AT_REGISTRATION])
    random_image(99, (52, 44)).save(root / relpaths[CHANGED_SINCE])  # bytes no longer the registered ones

    threads = _threads_preparing(TuneProcessor, monkeypatch)
    model = str(tiny_models_dir / "clip")
    with_ahead = _runs(engines[0], ahead, model)
    assert threads and all(name.startswith("views-ahead") for name in threads)
    threads.clear()
    with_one_thread = _runs(engines[1], alone, model)
    assert threads and threads == [threading.current_thread().name] * len(threads)

    for (predictions, views, errors), (base_predictions, base_views, base_errors) in zip(
            with_ahead, with_one_thread, strict=True):
        assert [p[0] for p in predictions] == [i for i in range(N) if i not in (FAILED_AT_REGISTRATION, CHANGED_SINCE)]
        assert predictions == base_predictions and views == base_views
        assert sorted(errors) == [FAILED_AT_REGISTRATION, CHANGED_SINCE] and errors == base_errors
        assert "changed since its dataset was registered" in errors[CHANGED_SINCE]
    tpt, zeroshot = with_ahead
    assert {p[-2:] for p in tpt[0]} == {(8, 0)} and {p[-2:] for p in zeroshot[0]} == {(0, 1)}  # built, then read


def test_a_features_run_prepares_ahead_too(tiny_models_dir: Path, workspace: Path, tmp_path: Path,
                                            database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`submit features` with views ahead stores every good sample's views (the bad ones are errors), which a
    TPT run then reads whole."""
    from difftpt_ops.services.reading.store import store_size
    from difftpt_ops.services.running.features import FeaturesProcessor, submit_features

    quiet_run_machinery(monkeypatch)
    root = tmp_path / "images"
    relpaths = write_pictures(root, N, seed=40, size=(52, 44))
    settings = make_settings(workspace, database_url, device="cpu", mlflow_tracking_uri="none", views_ahead="on")
    engine = open_engine(settings)
    add_dataset(engine, "pics", N, root=root, classes=2, relpaths=relpaths, failed=[FAILED_AT_REGISTRATION])
    random_image(99, (52, 44)).save(root / relpaths[CHANGED_SINCE])
    threads = _threads_preparing(FeaturesProcessor, monkeypatch)
    model = str(tiny_models_dir / "clip")
    filled = submit_features(engine, settings, dataset_ref="pics", model=model, pretrained=None, views="tpt")
    assert threads and all(name.startswith("views-ahead") for name in threads)
    assert store_size(engine)["entries"] == N - 2
    _, _, errors = _outcome(engine, filled.run_id)
    assert sorted(errors) == [FAILED_AT_REGISTRATION, CHANGED_SINCE]
    tpt = runs.submit_tune(engine, settings, dataset_ref="pics", method="tpt", model=model, pretrained=None,
                           overrides=SMALL_TPT)
    predictions, _, _ = _outcome(engine, tpt.run_id)
    assert len(predictions) == N - 2 and {p[-2:] for p in predictions} == {(0, 8)}


def test_a_repeated_image_reads_the_set_its_twin_just_stored(tiny_models_dir: Path, workspace: Path,
                                                              tmp_path: Path, database_url: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two samples with the same bytes (the same content hash) next to each other: one thread encodes the first
    and reads the second back from the store; preparing ahead must not gather the second before the first is
    stored (it would encode it again and record other views_encoded / views_read)."""
    import time

    from difftpt_ops.services.running.features import FeatureCache

    quiet_run_machinery(monkeypatch)
    root = tmp_path / "images"
    relpaths = write_pictures(root, N, seed=40, size=(52, 44))
    (root / relpaths[3]).write_bytes((root / relpaths[2]).read_bytes())  # samples 2 and 3: one image twice
    store = FeatureCache.store

    def slow_store(self: FeatureCache, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)  # a model slower than the next sample's look-up, as on a GPU at 64 views
        store(self, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "store", slow_store)
    model = str(tiny_models_dir / "clip")
    outcomes = []
    for name, setting in (("ahead", "on"), ("alone", "off")):
        settings = make_settings(tmp_path / name, database_url if setting == "on" else
                                 f"sqlite:///{tmp_path / 'alone.db'}", device="cpu", mlflow_tracking_uri="none",
                                 views_ahead=setting)
        engine = open_engine(settings)
        add_dataset(engine, "pics", N, root=root, classes=2, relpaths=relpaths)
        run = runs.submit_tune(engine, settings, dataset_ref="pics", method="tpt", model=model, pretrained=None,
                               overrides=SMALL_TPT)
        outcomes.append(_outcome(engine, run.run_id))
    (ahead, _, _), (alone, _, _) = outcomes
    assert [p[-2:] for p in alone] == [(8, 0), (8, 0), (8, 0), (0, 8), (8, 0), (8, 0)]
    assert ahead == alone
