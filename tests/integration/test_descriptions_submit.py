"""Class descriptions through `submit tune` (embedded, SQLite and PostgreSQL) and the CLI: the file becomes a
stored key in the spec, the predictions are the engine's with those descriptions, a resubmit attaches, a dry
run stores nothing, and a bad file is refused in one line with nothing stored."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select

from difftpt_ops.core.errors import InputError
from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.core.specs import ModelSpec
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Prediction, Run, Sweep
from difftpt_ops.models.clip import load_clip
from difftpt_ops.services.running import descriptions, estimate, runs, sweeps
from difftpt_ops.tta import prepare_classifier
from tests.integration.test_jobs_support import (
    REPO_ROOT,
    add_dataset,
    kill_worker,
    log_tail,
    make_settings,
    open_engine,
    quiet_run_machinery,
    redis_db,
    run_state,
    start_worker,
    wait_for,
    wait_ready,
    worker_env,
    write_pngs,
)
from workers.tasks import dispatcher_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

N_SAMPLES = 4
CLASSES = ["class0", "class1"]
TEXTS = {"class0": ["a bright red square.", "a red tile on a wall."], "class1": ["a dark blue square."]}


def _write(path: Path, payload: object) -> str:
    path.write_text(json.dumps(payload), encoding="utf-8")
    return str(path)


def _count(engine: object, table: object) -> int:
    with session_scope(engine) as session:  # type: ignore[arg-type]
        return int(session.scalar(select(func.count()).select_from(table)) or 0)  # type: ignore[arg-type]


def _runs(engine: object) -> int:
    return _count(engine, Run)


def _stored(engine: object, run_id: int) -> list[tuple[int, float]]:
    """(pred, confidence_after) of a run's predictions in sample order."""
    with session_scope(engine) as session:  # type: ignore[arg-type]
        rows = session.scalars(select(Prediction).where(Prediction.run_id == run_id).order_by(Prediction.sample_id))
        return [(p.pred, float(p.confidence_after)) for p in rows]  # type: ignore[arg-type]


def _assert_engine_results(stored: list[tuple[int, float]], clip_dir: str, overrides: dict[str, str], root: Path,
                           relpaths: list[str]) -> None:
    """A zero-shot run's stored (pred, confidence) are the engine's given TEXTS (per sample, seed 0)."""
    clip = load_clip(ModelSpec(name=clip_dir, pretrained=None))
    tuner = prepare_classifier(clip, CLASSES, method_spec_from("zeroshot", overrides), descriptions=TEXTS)
    expected = [tuner.run(Image.open(root / relpath), seed=0,
                          sample_key=hashlib.sha256(f"pics:{i}".encode()).hexdigest())
                for i, relpath in enumerate(relpaths)]
    assert [p for p, _ in stored] == [r.pred for r in expected]
    assert [c for _, c in stored] == pytest.approx([r.confidence_after for r in expected], abs=1e-5)


def _stored_files(settings: object) -> list[Path]:
    base = Path(settings.artifact_root) / descriptions.NAMESPACE  # type: ignore[attr-defined]
    return sorted(base.rglob("*.json")) if base.is_dir() else []


def _zeroshot_on_pics(workspace: Path, tmp_path: Path, tiny_models_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Settings and engine of an embedded SQLite workspace holding dataset `pics`, and zero-shot submit args."""
    settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", N_SAMPLES, root=root, classes=2, relpaths=write_pngs(root, N_SAMPLES))
    return settings, engine, dict(dataset_ref="pics", method="zeroshot", model=str(tiny_models_dir / "clip"),
                                  pretrained=None)


@pytest.mark.parametrize("method", ["zeroshot", "dmn-zs"])
def test_descriptions_file_becomes_a_stored_key_and_shapes_the_predictions(
        method: str, workspace: Path, database_url: str, tmp_path: Path, tiny_models_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_run_machinery(monkeypatch)
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    relpaths = write_pngs(root, N_SAMPLES)
    add_dataset(engine, "pics", N_SAMPLES, root=root, classes=2, relpaths=relpaths)
    clip_dir = str(tiny_models_dir / "clip")
    overrides = {"prompts": "tip", "descriptions": _write(tmp_path / "cupl.json", TEXTS)}
    if method == "dmn-zs":
        overrides["n_views"] = "4"
    submit = dict(dataset_ref="pics", method=method, model=clip_dir, pretrained=None)

    # A dry run resolves the same spec but stores nothing.
    estimate.estimate_tune(engine, settings, generation_id=None, overrides=dict(overrides), seed=0, limit=None,
                           shard_size=None, **submit)
    assert _stored_files(settings) == []

    result = runs.submit_tune(engine, settings, overrides=dict(overrides), **submit)
    assert result.state == "finished"
    with session_scope(engine) as session:
        spec = session.get(Run, result.run_id).spec  # type: ignore[union-attr]
    stored = _stored(engine, result.run_id)
    key = spec["method"]["descriptions"]
    digest = hashlib.sha256(json.dumps(TEXTS, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert key == f"sha256:{digest}"
    assert [p.name for p in _stored_files(settings)] == [f"{digest}.json"]
    assert descriptions.load_descriptions(settings, key) == TEXTS

    # The run classified with the descriptions: its confidences differ from the same run without them, and
    # (zero-shot, per sample) equal the engine's given the file's content.
    plain = runs.submit_tune(engine, settings, overrides={k: v for k, v in overrides.items() if k != "descriptions"},
                             **submit)
    assert [c for _, c in _stored(engine, plain.run_id)] != pytest.approx([c for _, c in stored], abs=1e-6)
    if method == "zeroshot":
        _assert_engine_results(stored, clip_dir, {**overrides, "descriptions": key}, root, relpaths)

    # The same text under another path, or the key itself: the same run. Other text: another run.
    again = runs.submit_tune(engine, settings, overrides={**overrides, "descriptions": _write(
        tmp_path / "copy.json", {"class1": TEXTS["class1"], "class0": TEXTS["class0"]})}, **submit)
    by_key = runs.submit_tune(engine, settings, overrides={**overrides, "descriptions": key}, **submit)
    assert again.run_id == by_key.run_id == result.run_id and not again.created
    other = runs.submit_tune(engine, settings, overrides={**overrides, "descriptions": _write(
        tmp_path / "other.json", {**TEXTS, "class1": ["a navy blue square."]})}, **submit)
    assert other.run_id != result.run_id and len(_stored_files(settings)) == 2


def test_bad_descriptions_are_refused_naming_the_file_and_nothing_is_stored(
        workspace: Path, tmp_path: Path, tiny_models_dir: Path) -> None:
    settings, engine, submit = _zeroshot_on_pics(workspace, tmp_path, tiny_models_dir)
    cases = {
        "missing a class": (_write(tmp_path / "partial.json", {"class0": ["x."]}), "1 of the dataset's 2 classes"),
        "not an object": (_write(tmp_path / "list.json", ["a", "b"]), "JSON object"),
        "empty list": (_write(tmp_path / "empty.json", {"class0": [], "class1": ["y."]}), "non-empty list"),
        "no such file": (str(tmp_path / "absent.json"), "cannot be read"),
        "unknown key": ("sha256:" + "0" * 64, "not in the artifact store"),
    }
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    cases["broken JSON"] = (str(tmp_path / "broken.json"), "not a JSON file")
    good = _write(tmp_path / "good.json", TEXTS)
    cases["a random context"] = (good, "a random or CoOp context has none")
    for name, (value, says) in cases.items():
        extra = {"prompt.ctx_init": "none"} if name == "a random context" else {}
        with pytest.raises(InputError, match="descriptions") as caught:
            runs.submit_tune(engine, settings, overrides={"descriptions": value, **extra}, **submit)
        assert says in str(caught.value) and value in str(caught.value), name
    # A sweep over a good and a bad file fails before anything is written: no sweep, no run, no file.
    for grid in ({"descriptions": [good, str(tmp_path / "partial.json")]},
                 {"descriptions": [good], "prompt.ctx_init": ["a_photo_of_a", "none"]}):
        with pytest.raises(InputError, match="descriptions"):
            sweeps.submit_sweep(engine, settings, grid=grid, seeds=[0], **submit)
    assert _runs(engine) == 0 and _count(engine, Sweep) == 0 and _stored_files(settings) == []


def test_a_sweep_is_identified_by_the_texts_not_the_paths(
        workspace: Path, tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its grid holds the stored keys: the same texts under other paths are the same sweep and runs."""
    quiet_run_machinery(monkeypatch)
    settings, engine, submit = _zeroshot_on_pics(workspace, tmp_path, tiny_models_dir)
    other = {**TEXTS, "class1": ["a navy blue square."]}
    first = sweeps.submit_sweep(engine, settings, grid={"descriptions": [
        _write(tmp_path / "a.json", TEXTS), _write(tmp_path / "b.json", other)]}, seeds=[0], **submit)
    moved = tmp_path / "moved"
    moved.mkdir()
    again = sweeps.submit_sweep(engine, settings, grid={"descriptions": [
        _write(moved / "a.json", TEXTS), _write(moved / "b.json", other)]}, seeds=[0], **submit)
    assert first.created and not again.created and again.sweep_id == first.sweep_id and again.new_runs == 0
    assert all(p["point"]["descriptions"].startswith("sha256:") for p in first.points)
    assert _runs(engine) == 2 and len(_stored_files(settings)) == 2


def test_a_stored_file_changed_by_hand_is_named_and_restored_by_the_path(
        workspace: Path, tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_run_machinery(monkeypatch)
    settings, engine, submit = _zeroshot_on_pics(workspace, tmp_path, tiny_models_dir)
    path = _write(tmp_path / "cupl.json", TEXTS)
    result = runs.submit_tune(engine, settings, overrides={"descriptions": path}, **submit)
    [stored] = _stored_files(settings)
    stored.write_text(json.dumps({**TEXTS, "class1": ["edited."]}), encoding="utf-8")
    key = f"sha256:{stored.stem}"
    with pytest.raises(InputError, match="changed since it was stored.*path"):
        descriptions.load_descriptions(settings, key)
    again = runs.submit_tune(engine, settings, overrides={"descriptions": path}, **submit)
    assert again.run_id == result.run_id and descriptions.load_descriptions(settings, key) == TEXTS


def test_cli_refuses_a_file_missing_classes_in_one_line(tmp_path: Path, tiny_models_dir: Path) -> None:
    import os

    workspace = tmp_path / "ws"
    workspace.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")}
    env.update({"DIFFTPT_OPS_WORKSPACE": str(workspace), "HF_HUB_OFFLINE": "1", "COLUMNS": "250",
                "PYTHONPATH": str(REPO_ROOT), "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none"})
    root = tmp_path / "images"
    write_pngs(root, N_SAMPLES)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300, check=False)

    assert cli("data", "add", "pics", "--root", str(root)).returncode == 0
    partial = _write(tmp_path / "partial.json", {"class0": ["a red square."]})
    done = cli("submit", "tune", "--dataset", "pics", "--method", "zeroshot", "--model",
               str(tiny_models_dir / "clip"), "--pretrained", "none", "--set", f"descriptions={partial}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "descriptions" in lines[0] and partial in lines[0] and "class1" in lines[0], lines[0]
    listed = cli("runs", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_a_worker_reads_the_stored_descriptions(workspace: Path, tmp_path: Path, tiny_models_dir: Path) -> None:
    """A real worker on Redis, another process than the submit: it reads the file from the artifact store and
    its predictions are the engine's given the texts."""
    with redis_db() as broker:
        settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", broker_url=broker, device="cpu")
        engine = open_engine(settings)
        root = tmp_path / "images"
        relpaths = write_pngs(root, N_SAMPLES)
        add_dataset(engine, "pics", N_SAMPLES, root=root, classes=2, relpaths=relpaths)
        clip_dir = str(tiny_models_dir / "clip")
        overrides = {"prompts": "tip", "descriptions": _write(tmp_path / "cupl.json", TEXTS)}
        log = tmp_path / "worker.log"
        worker = start_worker(worker_env(settings, broker, device="cpu"), log)
        try:
            wait_ready(log)
            result = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=clip_dir,
                                      pretrained=None, overrides=dict(overrides), dispatcher=dispatcher_for(settings))
            wait_for(lambda: run_state(engine, result.run_id) == "finished", timeout=180, what="the run",
                     explain=lambda: log_tail(log))
        finally:
            kill_worker(worker)
        with session_scope(engine) as session:
            key = session.get(Run, result.run_id).spec["method"]["descriptions"]  # type: ignore[union-attr]
    _assert_engine_results(_stored(engine, result.run_id), clip_dir, {**overrides, "descriptions": key}, root,
                           relpaths)


def test_descriptions_errors_name_the_option_they_were_typed_with(workspace: Path, tmp_path: Path,
                                                                  tiny_models_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: a bad descriptions file said `descriptions=FILE: ...`, where every other spec value is named as typed
    (`--set k_image=0: ...`): now `--set descriptions=FILE`, or `--sweep descriptions=FILE` for a file of the grid,
    AWT's own checks included; nothing is written."""
    from typer.testing import CliRunner

    from cli.main import app

    settings, engine, submit = _zeroshot_on_pics(workspace, tmp_path, tiny_models_dir)
    for key, value in {"DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": settings.database_url,
                       "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none"}.items():
        monkeypatch.setenv(key, value)
    good, partial = _write(tmp_path / "good.json", TEXTS), _write(tmp_path / "partial.json", {"class0": ["x."]})
    tune = ["submit", "tune", "--dataset", "pics", "--model", submit["model"], "--pretrained", "none",
            "--device", "cpu"]
    for args, starts in (
            (["--method", "zeroshot", "--set", f"descriptions={partial}"], f"--set descriptions={partial}: "),
            (["--method", "zeroshot", "--sweep", f"descriptions={good},{partial}"],
             f"--sweep descriptions={partial}: "),
            (["--method", "awt"], "--set descriptions=None: AWT needs class descriptions"),
            (["--method", "awt", "--set", f"descriptions={good}"], f"--set descriptions={good}: AWT uses "),
            (["--method", "awt", "--set", "num_descriptor=1", "--sweep", f"descriptions={partial},{good}"],
             f"--sweep descriptions={partial}: ")):
        result = CliRunner().invoke(app, [*tune, *args])
        [line] = result.output.strip().splitlines()
        assert result.exit_code == 2 and line.startswith(f"error: {starts}"), line
    assert _runs(engine) == 0 and _count(engine, Sweep) == 0 and _stored_files(settings) == []
