"""`table --log` and the grouping tags of runs, read back from a sqlite MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from cli.main import app
from difftpt_ops.config import Settings, load_settings
from difftpt_ops.db.session import get_engine, session_scope, upgrade
from difftpt_ops.db.tables import Run
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.reading.table_model import TableQuery
from difftpt_ops.services.reading.table_render import TABLE_EXPERIMENT
from tests.factories import make_dataset, make_dataset_version, make_predictions, make_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its schema (its migrations take seconds), built once per module."""
    path = tmp_path_factory.mktemp("table-mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracked(workspace: Path, mlflow_store: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Engine, Settings]:
    shutil.copy(mlflow_store, workspace / "mlflow.db")
    env = {"DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": f"sqlite:///{workspace / 'd.db'}",
           "DIFFTPT_OPS_MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(workspace, env=env)
    engine = get_engine(settings.database_url)
    upgrade(engine)
    with session_scope(engine) as session:
        version = make_dataset_version(session, n_samples=12, dataset=make_dataset(session, name="shapes"))
        for method, seed in (("zeroshot", 0), ("tpt", 0), ("tpt", 1)):
            spec = {"kind": "tune", "method": {"method": method}, "model": {"name": "tiny"}, "seed": seed,
                    "dataset_fingerprint": version.fingerprint}
            run = make_run(session, version, method=method, spec=spec)
            make_predictions(session, run, [(i + seed) % 3 != 0 for i in range(12)])
    return engine, settings


def test_table_log_writes_one_run_named_after_the_query(tracked: tuple[Engine, Settings]) -> None:
    """Markdown, CSV, JSON and a PNG heatmap on one MLflow run; logging again reuses that run."""
    _, settings = tracked
    for _ in range(2):
        result = CliRunner().invoke(app, ["table", "--log", "--format", "markdown"])
        assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(TABLE_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == TableQuery().name() == "table top1"
    assert run.data.tags["difftpt.table.runs"] == "1,2,3"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"table.md", "table.csv", "table.json", "table_heatmap.png"}
    local = Path(client.download_artifacts(run.info.run_id, "table_heatmap.png"))
    with Image.open(local) as image:
        assert image.format == "PNG" and image.size[0] > 100
    markdown = Path(client.download_artifacts(run.info.run_id, "table.md")).read_text()
    assert markdown.startswith("| method | shapes (n=12) |")


def test_runs_carry_model_seed_and_method_tags(tracked: tuple[Engine, Settings]) -> None:
    """A synced run's MLflow tags name its method, dataset, model and seed, for the UI's grouping."""
    engine, settings = tracked
    reporting.sync_run(engine, settings, 3)
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    with session_scope(engine) as session:
        mlflow_run_id = session.get(Run, 3).mlflow_run_id
    tags = client.get_run(mlflow_run_id).data.tags
    assert (tags["difftpt.method"], tags["difftpt.dataset"], tags["difftpt.model"], tags["difftpt.seed"]) == (
        "tpt", "shapes", "tiny", "1")


def test_log_with_tracking_off_is_bad_input(tracked: tuple[Engine, Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    """--log when tracking is turned off: exit 2, one line naming --log, nothing printed as a table."""
    monkeypatch.setenv("DIFFTPT_OPS_MLFLOW_TRACKING_URI", "none")
    result = CliRunner().invoke(app, ["table", "--log"])
    assert result.exit_code == 2 and "--log" in result.output and "|" not in result.output


def test_sweep_runs_are_tagged_with_their_sweep(tracked: tuple[Engine, Settings]) -> None:
    """Each run of a sweep carries `difftpt.sweep` = its sweep id in MLflow, next to model and seed; tagging the
    runs after they ran embedded leaves them FINISHED (it used to reopen them as RUNNING, "resumed"). A tag
    MLflow missed is set by `mlflow sync`."""
    import json

    from tests.integration.test_jobs_support import add_dataset

    engine, settings = tracked
    add_dataset(engine, "toy", 4)
    result = CliRunner().invoke(app, ["submit", "tune", "--dataset", "toy", "--method", "noop", "--seeds", "0,1",
                                      "--json"])
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.output)
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    with session_scope(engine) as session:
        mlflow_ids = {p["run_id"]: session.get(Run, p["run_id"]).mlflow_run_id for p in sweep["points"]}
    seeds = {p["run_id"]: p["point"]["seed"] for p in sweep["points"]}
    for run_id, mlflow_run_id in mlflow_ids.items():
        mlflow_run = client.get_run(mlflow_run_id)
        tags = mlflow_run.data.tags
        assert tags["difftpt.sweep"] == str(sweep["sweep_id"]) and tags["difftpt.seed"] == str(seeds[run_id])
        assert mlflow_run.info.status == "FINISHED" and "difftpt.resume_count" not in tags
    # MLflow missed the tag (it was unreachable at submit): `mlflow sync` sets it
    lost = next(iter(mlflow_ids.values()))
    client.delete_tag(lost, "difftpt.sweep")
    assert CliRunner().invoke(app, ["mlflow", "sync", "--all", "--json"]).exit_code == 0
    assert client.get_run(lost).data.tags["difftpt.sweep"] == str(sweep["sweep_id"])


def test_sync_all_repairs_a_finished_run_mlflow_shows_running(tracked: tuple[Engine, Settings]) -> None:
    """A finished run whose MLflow run was left RUNNING (and not marked for sync): plain `mlflow sync` has
    nothing to do, `mlflow sync --all` sets it FINISHED; naming a run as well is bad input."""
    engine, settings = tracked
    reporting.sync_run(engine, settings, 2)
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    with session_scope(engine) as session:
        mlflow_run_id = session.get(Run, 2).mlflow_run_id
    client.update_run(mlflow_run_id, status="RUNNING")
    result = CliRunner().invoke(app, ["mlflow", "sync", "--json"])
    assert result.exit_code == 0 and client.get_run(mlflow_run_id).info.status == "RUNNING"
    result = CliRunner().invoke(app, ["mlflow", "sync", "--all", "--json"])
    assert result.exit_code == 0, result.output
    assert client.get_run(mlflow_run_id).info.status == "FINISHED"
    result = CliRunner().invoke(app, ["mlflow", "sync", "--all", "2"])
    assert result.exit_code == 2 and "--all" in result.output


def test_a_piped_table_is_never_cut_to_80_columns(tracked: tuple[Engine, Settings]) -> None:
    """Output to a pipe or file (CliRunner's is not a terminal) keeps every cell whole, however wide."""
    engine, _ = tracked
    names = [f"a-rather-long-dataset-name-{i}" for i in range(3)]
    with session_scope(engine) as session:
        for name in names:
            version = make_dataset_version(session, n_samples=12, dataset=make_dataset(session, name=name))
            spec = {"kind": "tune", "method": {"method": "zeroshot"}, "model": {"name": "tiny"}, "seed": 0,
                    "dataset_fingerprint": version.fingerprint}
            make_predictions(session, make_run(session, version, method="zeroshot", spec=spec), [True] * 12)
    result = CliRunner().invoke(app, ["table"])
    assert result.exit_code == 0, result.output
    assert all(f"{name} (n=12)" in result.output for name in names) and "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) > 80


def test_ece_bins_apply_to_an_ece_table_only(tracked: tuple[Engine, Settings]) -> None:
    """`--ece-bins` changes an ECE table's title; with another metric it is refused in one line (exit 2)."""
    engine, _ = tracked
    with session_scope(engine) as session:
        version = make_dataset_version(session, n_samples=12, dataset=make_dataset(session, name="photos"))
        spec = {"kind": "tune", "method": {"method": "zeroshot"}, "model": {"name": "tiny"}, "seed": 0,
                "dataset_fingerprint": version.fingerprint}
        make_predictions(session, make_run(session, version, method="zeroshot", spec=spec), [True] * 12)
    result = CliRunner().invoke(app, ["table", "--metric", "ece", "--ece-bins", "20", "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert "ece over 20 bins" in result.output
    refused = CliRunner().invoke(app, ["table", "--ece-bins", "20"])
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        "error: --ece-bins=20: only applies with --metric ece"]
