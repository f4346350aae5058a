"""MLflow tracking read back through MlflowClient: sqlite stores in tmp, and one real `mlflow server`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from difftpt_ops.config import Settings, load_settings
from difftpt_ops.core.specs import flatten
from difftpt_ops.db.session import get_engine, session_scope, upgrade
from difftpt_ops.db.tables import DatasetVersion, GenerationConfig, Run
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.reading.results import run_results
from difftpt_ops.storage.artifacts import ArtifactStore, encode_png
from difftpt_ops.tracking.mlflow_tracker import MlflowTracker, param_value
from tests.factories import (
    make_dataset_version,
    make_generated_images,
    make_generation_config,
    make_predictions,
    make_run,
    make_shard,
    make_view_scores,
    samples_of,
)

pytestmark = pytest.mark.integration
LOG_EVERY = 4
MASK = [True, False, True, True, False, True, True, True, False, True, True, False, True, True]
ARTIFACTS = {"predictions.parquet", "per_class.csv", "reliability.png", "per_class_gain.png", "view_grid.png"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_template(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its schema, copied per test.

    Creating one runs MLflow's migrations (about 15 s here), so it is built once and kept in pytest's
    cache directory, keyed by the MLflow version.
    """
    from importlib.metadata import version

    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    name = f"mlflow-store-{version('mlflow')}"
    directory = Path(cache.mkdir(name)) if cache is not None else tmp_path_factory.mktemp(name)
    path = directory / "mlflow.db"
    if not path.is_file():
        from mlflow import MlflowClient

        building = directory / f"building-{os.getpid()}.db"
        MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments()
        os.replace(building, path)  # atomic: a parallel session never copies a half-built store
    return path


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real `mlflow server`, started when the module starts so that it boots while other tests run."""
    directory = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_template, directory / "mlflow.db")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
               "--artifacts-destination", str(directory / "artifacts"),
               "--uvicorn-opts", "--timeout-graceful-shutdown 2"]
    log = directory / "server.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Server(f"http://127.0.0.1:{port}", process, log)
    finally:
        if process.poll() is None:  # SIGTERM to the process group stops the server and its workers
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _settings(workspace: Path, database_url: str, tracking_uri: str) -> Settings:
    return load_settings(workspace, env={"DIFFTPT_OPS_DATABASE_URL": database_url,
                                         "DIFFTPT_OPS_MLFLOW_TRACKING_URI": tracking_uri,
                                         "DIFFTPT_OPS_MLFLOW_LOG_EVERY": str(LOG_EVERY)})


@pytest.fixture
def tracked(workspace: Path, mlflow_template: Path) -> tuple[Engine, Settings]:
    """Our SQLite database and a sqlite MLflow store, both in the test's workspace."""
    shutil.copy(mlflow_template, workspace / "mlflow.db")
    settings = _settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", f"sqlite:///{workspace / 'mlflow.db'}")
    engine = get_engine(settings.database_url)
    upgrade(engine)
    return engine, settings


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def seed_run(engine: Engine, settings: Settings, method: str = "difftpt") -> int:
    """A running run over 16 samples; for DiffTPT with images on disk, generated variations and view scores."""
    root = settings.workspace / "data"
    store = ArtifactStore(settings.artifact_root)
    with session_scope(engine) as session:
        version = make_dataset_version(session, 16, 3, root=str(root))
        config = make_generation_config(session)
        run = make_run(session, version, method=method, state="running",
                       generation_config_id=config.id if method == "difftpt" else None)
        for sample in samples_of(session, version)[:2 if method == "difftpt" else 0]:
            _image(root / sample.relpath, (200, 20, 20))
            for image in make_generated_images(session, config, sample, 4):
                store.put_bytes(image.artifact_key, encode_png(Image.new("RGB", (16, 16), (20, 200, 20))))
            make_view_scores(session, run, sample, n_generated=4)
        make_shard(session, run, seconds=5400.0, gpu="cuda:0")
        make_shard(session, run, index=1, seconds=100.0, gpu=None)
        return run.id


def execute(engine: Engine, settings: Settings, run_id: int, mask: list[bool], start: int, batch: int = 3) -> None:
    """What the shard executor does: commit a batch of predictions, then report progress."""
    for offset in range(0, len(mask), batch):
        with session_scope(engine) as session:
            run = session.get(Run, run_id)
            assert run is not None
            chosen = samples_of(session, session.get(DatasetVersion, run.dataset_version_id))
            part = mask[offset:offset + batch]
            make_predictions(session, run, part, zeroshot_mask=[True] * len(part),
                             samples=chosen[start + offset:start + offset + len(part)])
        reporting.report_progress(engine, settings, run_id)


def finish(engine: Engine, settings: Settings, run_id: int) -> None:
    from difftpt_ops.db.tables import utcnow

    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.state, run.finished_at = "finished", utcnow()
    reporting.report_finished(engine, settings, run_id)


def _mapping(engine: Engine, run_id: int) -> tuple[str | None, bool]:
    with engine.connect() as conn:
        row = conn.execute(select(Run.mlflow_run_id, Run.mlflow_sync_needed).where(Run.id == run_id)).one()
    return row[0], bool(row[1])


def test_params_metrics_and_artifacts_read_back(tracked: tuple[Engine, Settings], tmp_path: Path) -> None:
    """One experiment per version, tags, flattened spec, running top-1 every N, final metrics, artifacts."""
    import pandas as pd
    from mlflow import MlflowClient

    engine, settings = tracked
    run_id = seed_run(engine, settings)
    execute(engine, settings, run_id, MASK, start=0)
    finish(engine, settings, run_id)
    mlflow_run_id, sync_needed = _mapping(engine, run_id)
    assert mlflow_run_id is not None and not sync_needed

    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(mlflow_run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    with engine.connect() as conn:
        spec, fingerprint, dataset = conn.execute(select(Run.spec, Run.fingerprint, Run.dataset_version_id)
                                                  .where(Run.id == run_id)).one()
        stored_experiment = conn.execute(select(DatasetVersion.mlflow_experiment_id)
                                         .where(DatasetVersion.id == dataset)).scalar_one()
    results = run_results(engine, run_id)
    assert experiment.name == f"{results['dataset']}@v1" and stored_experiment == experiment.experiment_id
    assert experiment.artifact_location.startswith((settings.artifact_root / "mlflow").resolve().as_uri())
    assert run.info.status == "FINISHED"
    assert run.data.tags["difftpt.fingerprint"] == fingerprint
    assert (run.data.tags["difftpt.run_id"], run.data.tags["difftpt.method"]) == (str(run_id), "difftpt")
    assert run.data.tags["difftpt.dataset"] == results["dataset"]
    with session_scope(engine) as session:
        generator = session.get(GenerationConfig, session.get(Run, run_id).generation_config_id).spec
    # The spec, and the settings of the generator that made its images (the spec holds only their fingerprint).
    assert run.data.params == {**{k: param_value(v) for k, v in flatten(spec).items()},
                               **{f"generator.{k}": param_value(v) for k, v in generator.items()}}
    assert (run.data.tags["generator.images_made"], run.data.tags["generator.images_imported"]) == ("8", "0")

    metrics = run.data.metrics
    for key in ("top1", "top5", "zeroshot_top1", "gain", "ece"):
        assert metrics[key] == pytest.approx(results[key]), key
    assert (metrics["samples_done"], metrics["failures"]) == (len(MASK), 0)
    assert metrics["mean_seconds_per_sample"] == pytest.approx(0.5)
    assert metrics["gpu_hours"] == pytest.approx(1.5)  # only the shard that ran on a GPU counts

    history = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run_id, "running_top1"))
    # Every LOG_EVERY samples, and the finished run's last sample (14 is not a multiple of 4).
    expected = [(n, sum(MASK[:n]) / n) for n in [*range(LOG_EVERY, len(MASK) + 1, LOG_EVERY), len(MASK)]]
    assert [step for step, _ in history] == [step for step, _ in expected]
    assert [value for _, value in history] == pytest.approx([value for _, value in expected])

    assert {a.path for a in client.list_artifacts(mlflow_run_id)} == ARTIFACTS
    local = client.download_artifacts(mlflow_run_id, "predictions.parquet", str(tmp_path))
    assert len(pd.read_parquet(local)) == len(MASK)


def test_a_ctrl_c_stopped_run_shows_killed_until_resume(tracked: tuple[Engine, Settings],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during an embedded run: MLflow shows KILLED (not RUNNING) while it is stopped; `resume` sets the
    same MLflow run RUNNING with the resume counted, and it ends FINISHED."""
    from mlflow import MlflowClient

    from difftpt_ops.services.running import contexts, runs
    from tests.integration.test_jobs_support import add_dataset, interrupt_noop_once_at

    engine, settings = tracked
    contexts.clear_caches()
    monkeypatch.setattr(reporting, "_next_report", {})
    add_dataset(engine, "toy", 40)
    interrupt_noop_once_at(monkeypatch, 21)
    with pytest.raises(KeyboardInterrupt):
        runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", shard_size=8)
    mlflow_run_id, _ = _mapping(engine, 1)
    client = MlflowClient(settings.mlflow_tracking_uri)
    assert client.get_run(mlflow_run_id).info.status == "KILLED"
    assert runs.resume_run(engine, settings, 1).state == "finished"
    assert _mapping(engine, 1)[0] == mlflow_run_id
    done = client.get_run(mlflow_run_id)
    assert done.info.status == "FINISHED" and done.data.tags["difftpt.resume_count"] == "1"


def test_resume_continues_the_same_mlflow_run(tracked: tuple[Engine, Settings]) -> None:
    """A resumed run goes back to RUNNING in the same MLflow run, with the resume recorded as a tag."""
    from mlflow import MlflowClient

    engine, settings = tracked
    run_id = seed_run(engine, settings, method="tpt")
    execute(engine, settings, run_id, MASK[:8], start=0)
    finish(engine, settings, run_id)
    first, _ = _mapping(engine, run_id)
    with session_scope(engine) as session:
        session.get(Run, run_id).state = "running"  # type: ignore[union-attr]
    execute(engine, settings, run_id, MASK[8:], start=8)
    client = MlflowClient(settings.mlflow_tracking_uri)
    assert _mapping(engine, run_id)[0] == first
    resumed = client.get_run(first)
    assert resumed.info.status == "RUNNING" and resumed.data.tags["difftpt.resume_count"] == "1"
    assert "difftpt.resumed.1" in resumed.data.tags
    finish(engine, settings, run_id)
    done = client.get_run(first)
    assert done.info.status == "FINISHED" and done.data.metrics["samples_done"] == len(MASK)
    steps = [m.step for m in client.get_metric_history(first, "running_top1")]
    assert sorted(steps) == sorted(set(steps)) == [*range(LOG_EVERY, len(MASK) + 1, LOG_EVERY), len(MASK)]

    # A lost mapping is recovered through the fingerprint tag, and a repeated sync logs nothing new.
    with session_scope(engine) as session:
        session.get(Run, run_id).mlflow_run_id = None  # type: ignore[union-attr]
    again = reporting.sync_run(engine, settings, run_id)
    assert again["mlflow_run_id"] == first and again["metrics_logged"] == 0 and again["artifacts"] == []
    assert len(client.search_runs([done.info.experiment_id])) == 1


def test_experiment_creation_tolerates_a_race(tmp_path: Path, mlflow_template: Path) -> None:
    """A process that loses the race to create the experiment uses the winner's."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    winner, loser = MlflowTracker(uri, tmp_path), MlflowTracker(uri, tmp_path)
    real_lookup, lookups = loser.client.get_experiment_by_name, []

    def first_lookup_misses(name: str):  # type: ignore[no-untyped-def]
        lookups.append(name)  # the loser looked before the winner created it
        return None if len(lookups) == 1 else real_lookup(name)

    loser.client.get_experiment_by_name = first_lookup_misses
    created = winner.ensure_experiment("race@v1")
    assert loser.ensure_experiment("race@v1") == created
    assert len(lookups) == 2


def _wait_healthy(server: Server, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.process.returncode}:\n{server.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout_s} s:\n{server.log.read_text()[-2000:]}")


@pytest.mark.slow
def test_unreachable_tracking_marks_for_sync_then_a_real_server_receives_the_run(
        workspace: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, mlflow_server: Server) -> None:
    """Tracking down: results stay in the database and the run is marked. Server up: `mlflow sync` delivers it.

    Our database is PostgreSQL here (the other tests use SQLite), as in the distributed deployment.
    """
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    database_url = postgres_url
    settings = _settings(workspace, database_url, f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    engine = get_engine(database_url)
    upgrade(engine)
    run_id = seed_run(engine, settings)
    execute(engine, settings, run_id, MASK, start=0)  # must not raise
    finish(engine, settings, run_id)
    assert _mapping(engine, run_id) == (None, True)
    assert run_results(engine, run_id)["done"] == len(MASK)

    _wait_healthy(mlflow_server)
    for name, value in {"DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": database_url,
                        "DIFFTPT_OPS_MLFLOW_TRACKING_URI": mlflow_server.url,
                        "DIFFTPT_OPS_MLFLOW_LOG_EVERY": str(LOG_EVERY)}.items():
        monkeypatch.setenv(name, value)
    from cli.main import app

    out = CliRunner().invoke(app, ["mlflow", "sync", "--json"])
    assert out.exit_code == 0, out.output
    mlflow_run_id, sync_needed = _mapping(engine, run_id)
    assert mlflow_run_id is not None and not sync_needed
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["samples_done"] == len(MASK)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: workers need no storage credentials
    assert len(client.get_metric_history(mlflow_run_id, "running_top1")) == len(MASK) // LOG_EVERY + 1  # + the last
    assert {a.path for a in client.list_artifacts(mlflow_run_id)} == ARTIFACTS
    assert CliRunner().invoke(app, ["mlflow", "sync", "--json"]).stdout.strip() == "[]"  # nothing left to do


def test_tracking_turned_off_does_nothing(workspace: Path) -> None:
    """With the tracking URI `none` the hooks neither track nor mark; `mlflow sync` says tracking is off."""
    from difftpt_ops.core.errors import InputError

    settings = _settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", "none")
    engine = get_engine(settings.database_url)
    upgrade(engine)
    run_id = seed_run(engine, settings, method="tpt")
    execute(engine, settings, run_id, MASK[:4], start=0)
    finish(engine, settings, run_id)
    assert _mapping(engine, run_id) == (None, False)
    with pytest.raises(InputError, match="turned off"):
        reporting.sync_runs(engine, settings)


def _first_use(uri: str, root: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    try:
        MlflowTracker(uri, Path(root)).ensure_experiment("first@v1")
        results.put("ok")
    except Exception as exc:  # noqa: BLE001  reported to the parent
        results.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def test_processes_that_first_use_a_new_sqlite_store_at_once_all_track(tmp_path: Path) -> None:
    """QA: a submit and a worker (or two GPU workers) that first touched a new MLflow sqlite store at the same time
    both created its tables ("table runs already exists", "duplicate column name: step"); one process lost its
    tracking and the store could be left half-migrated (`_alembic_tmp_experiments already exists` for every run
    after). The first use of a sqlite store is serialised by a lock file next to it."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for attempt in range(3):
        root = tmp_path / f"store{attempt}"
        root.mkdir()
        uri = f"sqlite:///{root / 'mlflow.db'}"
        barrier, results = context.Barrier(3), context.Queue()
        processes = [context.Process(target=_first_use, args=(uri, str(root), barrier, results)) for _ in range(3)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert outcomes == ["ok"] * 3, outcomes
        assert MlflowTracker(uri, root).client.get_experiment_by_name("first@v1") is not None
