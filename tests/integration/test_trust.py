"""What a run says is what it did: DiffTPT reads exactly its generated views, failed setups leave no zombie
runs, every run records its provenance, devices are what they say, and generation runs are not results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from difftpt_ops.core.errors import InputError, NotFoundError
from difftpt_ops.core.specs import GenerationSpec
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Prediction, Run, Sample, Shard, ViewScore
from difftpt_ops.db.tables import SampleError as SampleErrorRow
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.running import outcomes, processors, runs, shards
from difftpt_ops.services.running.status import list_runs, run_status, show_run
from tests.conftest import scratch_database
from tests.integration.test_jobs_support import (
    REPO_ROOT,
    add_dataset,
    error_rows,
    kill_worker,
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

pytestmark = pytest.mark.integration

SMALL_DIFFTPT = {"n_conventional": "2", "n_generated": "2", "steps": "1"}


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def quiet_reporting(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_run_machinery(monkeypatch)


def _generation_spec(tiny_models_dir: Path, per_sample: int = 2) -> GenerationSpec:
    return GenerationSpec(model=str(tiny_models_dir / "sd-image-variations"), revision=None, steps=2, size=64,
                          per_sample=per_sample)


def _generated_counts(engine: object, run_id: int) -> list[int]:
    with session_scope(engine) as session:  # type: ignore[arg-type]
        return list(session.scalars(select(Prediction.n_generated).where(Prediction.run_id == run_id)
                                    .order_by(Prediction.sample_index)))


def _generated_views(engine: object, run_id: int) -> set[int]:
    """Per sample, how many view_scores rows are generated views."""
    with session_scope(engine) as session:  # type: ignore[arg-type]
        kinds = session.execute(select(ViewScore.sample_id, ViewScore.kind).where(ViewScore.run_id == run_id)).all()
    per_sample: dict[int, int] = {}
    for sample_id, kind in kinds:
        per_sample[sample_id] = per_sample.get(sample_id, 0) + (kind == "generated")
    return set(per_sample.values())


@pytest.mark.slow
def test_split_queues_difftpt_waits_for_its_images(backend: str, workspace: Path, tmp_path: Path,
                                                   tiny_models_dir: Path) -> None:
    """The README's split layout: a slowed `generate` worker and a `tune` worker; tuning submitted at once.
    Tune shards wait for their images; every DiffTPT row used exactly the spec's generated views; the run
    finishes after the generation does."""
    from workers.tasks import dispatcher_for

    with scratch_database(backend, workspace) as database_url, redis_db() as broker:
        settings = make_settings(workspace, database_url, broker_url=broker)
        engine = open_engine(settings)
        root = tmp_path / "images"
        add_dataset(engine, "pics", 6, root=root, classes=2, relpaths=write_pngs(root, 6))
        gen_log, tune_log = tmp_path / "generate.log", tmp_path / "tune.log"
        generator = start_worker(worker_env(settings, broker, generate_delay_s="1.5"), gen_log,
                                 "--queues", "generate")
        tuner = start_worker(worker_env(settings, broker), tune_log, "--queues", "tune")
        try:
            wait_ready(gen_log), wait_ready(tune_log)
            generated = runs.submit_generate(engine, settings, dataset_ref="pics",
                                             spec=_generation_spec(tiny_models_dir), shard_size=2,
                                             dispatcher=dispatcher_for(settings))
            tuned = runs.submit_tune(engine, settings, dataset_ref="pics", method="difftpt",
                                     model=str(tiny_models_dir / "clip"), pretrained=None, overrides=SMALL_DIFFTPT,
                                     shard_size=2, dispatcher=dispatcher_for(settings))
            assert tuned.generation_config_id == generated.generation_config_id
            assert tuned.shards_dispatched < tuned.shards_total  # some shards wait for their images
            [status] = run_status(engine, settings, tuned.run_id)
            assert status["shards"].get("waiting") and "waiting for generation config" in \
                status["waiting_shards"][0]["reason"]
            wait_for(lambda: run_state(engine, tuned.run_id) not in {"pending", "running"}, timeout=400,
                     what="the DiffTPT run to end")
        finally:
            kill_worker(generator)
            kill_worker(tuner)
        assert run_state(engine, generated.run_id) == "finished", gen_log.read_text()[-3000:]
        assert run_state(engine, tuned.run_id) == "finished", tune_log.read_text()[-3000:]
        assert _generated_counts(engine, tuned.run_id) == [2] * 6
        assert _generated_views(engine, tuned.run_id) == {2}
        with session_scope(engine) as session:
            gen_run, tune_run = session.get(Run, generated.run_id), session.get(Run, tuned.run_id)
            assert tune_run.finished_at >= gen_run.finished_at
            assert all(s.provenance and s.provenance["device"] == "cpu"
                       for s in session.scalars(select(Shard).where(Shard.run_id == tuned.run_id)))


def test_embedded_difftpt_refuses_missing_images_and_fails_samples_whose_generation_failed(
        database_url: str, workspace: Path, tmp_path: Path, tiny_models_dir: Path, quiet_reporting: None) -> None:
    """Embedded: a DiffTPT run whose images are not all there is refused (nothing written); a sample whose
    generation failed is a failed sample of the DiffTPT run with that reason, never tuned with fewer views."""
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 4, root=root, classes=2, relpaths=write_pngs(root, 4))
    clip = str(tiny_models_dir / "clip")
    spec = _generation_spec(tiny_models_dir)
    runs.submit_generate(engine, settings, dataset_ref="pics", spec=spec, limit=2)  # half the samples
    with pytest.raises(InputError, match="2 of 4 samples do not have their 2 generated images"):
        runs.submit_tune(engine, settings, dataset_ref="pics", method="difftpt", model=clip, pretrained=None,
                         overrides=SMALL_DIFFTPT)
    with session_scope(engine) as session:
        assert session.scalars(select(Run).where(Run.kind == "tune")).all() == []

    generated = runs.submit_generate(engine, settings, dataset_ref="pics", spec=spec, limit=3)
    with session_scope(engine) as session:  # the generator failed on sample 3 (as a GPU out of memory would)
        gen_run = session.get(Run, generated.run_id)
        sample = session.scalars(select(Sample).where(Sample.index == 3)).one()
        session.add(SampleErrorRow(run_id=gen_run.id, sample_id=sample.id, sample_index=3,
                                   error="RuntimeError: CUDA out of memory"))
    tuned = runs.submit_tune(engine, settings, dataset_ref="pics", method="difftpt", model=clip, pretrained=None,
                             overrides=SMALL_DIFFTPT)
    assert tuned.state == "finished_with_failures"
    assert _generated_counts(engine, tuned.run_id) == [2, 2, 2]
    [error] = error_rows(engine, tuned.run_id)
    assert error.sample_index == 3 and "generation failed (RuntimeError: CUDA out of memory)" in error.error


def test_a_difftpt_run_waiting_on_a_generation_nothing_runs_is_stopped(database_url: str, workspace: Path,
                                                                        tmp_path: Path, tiny_models_dir: Path,
                                                                        quiet_reporting: None) -> None:
    """Waiting shards wait for images a queued generation run will make: not stopped. Once that generation
    run is cancelled nothing will make them: the tuning run reads stopped and names the generation run."""
    from cli.status_cmds import stopped_line
    from tests.integration.test_jobs_support import RecordingDispatcher

    settings = make_settings(workspace, database_url, broker_url="redis://127.0.0.1:1/0", device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 4, root=root, classes=2, relpaths=write_pngs(root, 4))
    generated = runs.submit_generate(engine, settings, dataset_ref="pics", spec=_generation_spec(tiny_models_dir),
                                     shard_size=2, dispatcher=RecordingDispatcher())
    tuned = runs.submit_tune(engine, settings, dataset_ref="pics", method="difftpt",
                             model=str(tiny_models_dir / "clip"), pretrained=None, overrides=SMALL_DIFFTPT,
                             shard_size=2, dispatcher=RecordingDispatcher())
    status = run_status(engine, settings, tuned.run_id)[0]
    assert (status["stopped"], status["idle_generations"], len(status["waiting_shards"])) == (False, None, 2)
    runs.cancel_run(engine, settings, generated.run_id)
    status = run_status(engine, settings, tuned.run_id)[0]
    assert status["stopped"] is True
    assert status["idle_generations"] == [{"run_id": generated.run_id, "state": "cancelled"}]
    assert {r["run_id"]: r["stopped"] for r in list_runs(engine, settings)} == {tuned.run_id: True,
                                                                                 generated.run_id: False}
    assert stopped_line(status).endswith(f"(run {generated.run_id}: cancelled); `difftpt-ops resume "
                                          f"{generated.run_id}`, then `difftpt-ops resume {tuned.run_id}`")


def test_waiting_shards_are_released_when_the_images_arrive(database_url: str, workspace: Path, tmp_path: Path,
                                                            tiny_models_dir: Path, quiet_reporting: None) -> None:
    """With a broker, unready tune shards wait; the generation shard that completes them returns them as
    follow-up tickets; a sample without its images in a claimed shard parks the shard (no attempt spent)."""
    from difftpt_ops.services.running.leases import WorkerIdentity

    class Recorder:
        def __init__(self) -> None:
            self.sent: list[int] = []

        def check(self) -> None:
            pass

        def send(self, tickets: list) -> None:  # type: ignore[type-arg]
            self.sent += [ticket.shard_id for ticket in tickets]

    settings = make_settings(workspace, database_url, broker_url="redis://127.0.0.1:1/0", device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 4, root=root, classes=2, relpaths=write_pngs(root, 4))
    dispatcher = Recorder()
    generated = runs.submit_generate(engine, settings, dataset_ref="pics", spec=_generation_spec(tiny_models_dir),
                                     shard_size=2, dispatcher=dispatcher)
    tuned = runs.submit_tune(engine, settings, dataset_ref="pics", method="difftpt",
                             model=str(tiny_models_dir / "clip"), pretrained=None, overrides=SMALL_DIFFTPT,
                             shard_size=2, dispatcher=dispatcher)
    assert tuned.shards_dispatched == 0
    with session_scope(engine) as session:
        tune_shards = list(session.scalars(select(Shard).where(Shard.run_id == tuned.run_id).order_by(Shard.index)))
        gen_shards = list(session.scalars(select(Shard).where(Shard.run_id == generated.run_id)
                                          .order_by(Shard.index)))
        assert {s.state for s in tune_shards} == {"waiting"}
        tune_ids, gen_ids = [s.id for s in tune_shards], [s.id for s in gen_shards]
    identity = WorkerIdentity(name="test")
    first = shards.execute_shard(engine, settings, gen_ids[0], identity=identity)
    assert first.outcome == outcomes.Outcome.DONE, first
    assert [t.shard_id for t in first.follow_up] == [tune_ids[0]]  # only the shard whose samples are complete
    # A queued shard whose images vanished meanwhile parks instead of tuning with fewer views.
    with session_scope(engine) as session:
        session.execute(Shard.__table__.update().where(Shard.id == tune_ids[1]).values(state="queued"))
    parked = shards.execute_shard(engine, settings, tune_ids[1], identity=identity)
    assert parked.outcome == outcomes.Outcome.WAITING
    with session_scope(engine) as session:
        shard = session.get(Shard, tune_ids[1])
        assert (shard.state, shard.attempts) == ("waiting", 0) and "generated images" in shard.waiting_reason
    done = shards.execute_shard(engine, settings, tune_ids[0], identity=identity)
    assert done.outcome == outcomes.Outcome.DONE
    assert _generated_counts(engine, tuned.run_id) == [2, 2]


def test_failed_setup_leaves_a_failed_run_that_a_resubmit_restarts(database_url: str, workspace: Path,
                                                                    tmp_path: Path, tiny_models_dir: Path,
                                                                    quiet_reporting: None) -> None:
    """A dataset root that is gone fails the run with the reason (no run left running); once the root is
    back, the same submit starts the same run again and finishes it."""
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 3, root=root, classes=2, relpaths=write_pngs(root, 3))
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    clip = str(tiny_models_dir / "clip")
    with pytest.raises(NotFoundError, match="does not exist"):
        runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=clip, pretrained=None)
    with session_scope(engine) as session:
        [run] = session.scalars(select(Run)).all()
        assert run.state == "failed" and "dataset root" in run.error
    shutil.move(moved, root)
    again = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=clip, pretrained=None)
    assert (again.run_id, again.created, again.state) == (run.id, False, "finished")


def test_runs_record_provenance_and_comparable_columns(database_url: str, workspace: Path, tmp_path: Path,
                                                       tiny_models_dir: Path, quiet_reporting: None) -> None:
    """Versions, host and device in the database and as MLflow tags; model, seed and non-default settings
    as columns; `runs show --json` shows them."""
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 2, root=root, classes=2, relpaths=write_pngs(root, 2))
    result = runs.submit_tune(engine, settings, dataset_ref="pics", method="tpt", model=str(tiny_models_dir / "clip"),
                              pretrained=None, overrides={"n_views": "4", "steps": "2"}, seed=3)
    [listed] = [r for r in list_runs(engine, settings) if r["run_id"] == result.run_id]
    assert (listed["seed"], listed["device"], listed["precision"]) == (3, "cpu", "fp32")
    assert listed["settings"] == "n_views=4 steps=2" and listed["model"].endswith("clip")  # as `table` names it
    shown = show_run(engine, result.run_id)
    import torch

    assert shown["provenance"]["torch"] == torch.__version__ and shown["provenance"]["python"]
    assert shown["spec"]["device"] == "cpu" and shown["spec"]["model"]["precision"] == "fp32"
    [group] = shown["shard_provenance"]
    assert (group["device"], group["precision"], group["activation"]) == ("cpu", "fp32", "gelu")
    assert group["text_groups"] == 1  # the two class prompts have one length: one group even on a CPU
    assert group["device_name"] and group["host"] and group["shards"] == [0]
    tags = reporting.provenance_tags(engine, runs_row(engine, result.run_id))
    assert tags["provenance.torch"] == torch.__version__ and tags["worker.precision"] == "fp32"
    assert tags["worker.text_groups"] == "1"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")},
           "DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": database_url}
    out = subprocess.run([sys.executable, "-m", "cli.main", "runs", "show", str(result.run_id), "--json"], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["shard_provenance"][0]["precision"] == "fp32"


def test_a_run_records_its_weights_and_refuses_changed_ones(database_url: str, workspace: Path, tmp_path: Path,
                                                           quiet_reporting: None) -> None:
    """The spec names a local model folder by its path: the weights its shards computed with are recorded
    (sha256 in the shards' provenance, `runs show`, the MLflow tag worker.weights), and a shard of the run that
    finds other weights in that folder fails with a reason instead of mixing two models in one run."""
    from difftpt_ops.models.tiny_clip import make_tiny_clip
    from difftpt_ops.services.running.contexts import clear_caches

    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 2, root=root, classes=2, relpaths=write_pngs(root, 2))
    folder = tmp_path / "my-clip"
    make_tiny_clip(folder, seed=1)
    clear_caches()
    first = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=str(folder),
                             pretrained=None, limit=1, shard_size=1)
    assert first.state == "finished"
    [group] = show_run(engine, first.run_id)["shard_provenance"]
    assert len(group["weights"]) == 64
    tags = reporting.provenance_tags(engine, runs_row(engine, first.run_id))
    assert tags["worker.weights"] == group["weights"]

    make_tiny_clip(folder, seed=2)  # the same folder, other weights
    clear_caches()  # a fresh process (a worker, the next CLI call) loads what the folder holds now
    with pytest.raises(InputError, match="weights changed"):
        runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=str(folder), pretrained=None,
                         limit=2, shard_size=1)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)
                              .where(Prediction.run_id == first.run_id)) == 1  # nothing of the new weights stored
    make_tiny_clip(folder, seed=1)  # the weights it ran with, back: the run goes on
    clear_caches()
    again = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=str(folder),
                             pretrained=None, limit=2, shard_size=1)
    assert (again.run_id, again.state) == (first.run_id, "finished")
    weights = {g["weights"] for g in show_run(engine, first.run_id)["shard_provenance"]}
    assert weights == {group["weights"]}
    assert _weights_of(folder) == group["weights"]


def test_a_file_changed_since_registration_is_a_failed_sample_and_data_verify_names_it(
        database_url: str, workspace: Path, tmp_path: Path, tiny_models_dir: Path, quiet_reporting: None) -> None:
    """Views, features and results are keyed by the registered content hash: a run computes nothing from a file
    whose bytes changed since `data add` (the sample fails with the reason), the other samples run, and
    `verify_dataset` finds the changed and the missing file before any run does."""
    from PIL import Image

    from difftpt_ops.services.dataset_files import verify_dataset

    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    relpaths = write_pngs(root, 4)
    add_dataset(engine, "pics", 4, root=root, classes=2, relpaths=relpaths)
    assert verify_dataset(engine, "pics")["unchanged"] == 4
    Image.new("RGB", (40, 40), (1, 2, 3)).save(root / relpaths[1])  # other pixels under the registered name
    (root / relpaths[3]).unlink()
    report = verify_dataset(engine, "pics")
    assert {key: report[key] for key in ("checked", "unchanged", "changed", "missing", "unreadable")} == {
        "checked": 4, "unchanged": 2, "changed": 1, "missing": 1, "unreadable": 0}
    assert [(p["index"], p["problem"]) for p in report["problems"]] == [(1, "changed"), (3, "missing")]

    run = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot",
                           model=str(tiny_models_dir / "clip"), pretrained=None, shard_size=2)
    assert run.state == "finished_with_failures"
    reasons = {row.sample_index: row.error for row in error_rows(engine, run.run_id)}
    assert set(reasons) == {1, 3}
    assert "changed since its dataset was registered" in reasons[1] and "file not found" in reasons[3]
    with session_scope(engine) as session:
        assert sorted(session.scalars(select(Prediction.sample_index).where(Prediction.run_id == run.run_id))) == [
            0, 2]
    # A run with the feature store off reads the files itself (TuneProcessor), and refuses the same one.
    recompute = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot",
                                 model=str(tiny_models_dir / "clip"), pretrained=None, shard_size=2,
                                 overrides={"features": "recompute"})
    assert recompute.run_id != run.run_id and recompute.state == "finished_with_failures"
    reasons = {row.sample_index: row.error for row in error_rows(engine, recompute.run_id)}
    assert set(reasons) == {1, 3} and "changed since its dataset was registered" in reasons[1]


def _weights_of(folder: Path) -> str:
    """sha256 of the weights a run loads from a local model folder."""
    from difftpt_ops.core.specs import ModelSpec
    from difftpt_ops.models.clip import load_clip
    from difftpt_ops.storage.features import clip_weights_digest, image_tower, weights_digest

    model = load_clip(ModelSpec(name=str(folder), pretrained=None), "cpu").model
    return clip_weights_digest(model, weights_digest(image_tower(model)))


def runs_row(engine: object, run_id: int) -> Run:
    with session_scope(engine) as session:  # type: ignore[arg-type]
        run = session.get(Run, run_id)
        session.expunge(run)
        return run


def test_devices_are_what_they_say(database_url: str, workspace: Path, tiny_models_dir: Path) -> None:
    """--device cuda without CUDA is refused at submit; a cuda run never runs on a CPU-only process; auto
    is resolved once and stored."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    settings = make_settings(workspace, database_url)
    engine = open_engine(settings)
    add_dataset(engine, "toy", 2)
    with pytest.raises(InputError, match="CUDA is not available"):
        runs.submit_tune(engine, settings, dataset_ref="toy", method="noop", device="cuda")
    result = runs.submit_tune(engine, settings, dataset_ref="toy", method="noop")
    with session_scope(engine) as session:
        assert session.get(Run, result.run_id).spec["device"] == "cpu"
    with pytest.raises(InputError, match="no usable CUDA device"):
        processors.execution_device(settings, "cuda", None)


def test_worker_with_gpus_that_torch_cannot_use_refuses_to_start(workspace: Path) -> None:
    """`worker --gpus 0` where the GPU is listed but torch cannot use CUDA: one line, exit 2, no child."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")},
           "DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_BROKER_URL": "redis://127.0.0.1:6379/0",
           "CUDA_VISIBLE_DEVICES": "0"}
    out = subprocess.run([sys.executable, "-m", "cli.main", "worker", "--gpus", "0"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot use CUDA" in lines[0] and "Traceback" not in out.stderr


def test_results_compare_export_refuse_a_generation_run(database_url: str, workspace: Path, tmp_path: Path,
                                                        tiny_models_dir: Path, quiet_reporting: None) -> None:
    """A generation run has images, not predictions: one line and exit 2 from results, compare and export."""
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 2, root=root, classes=2, relpaths=write_pngs(root, 2))
    generated = runs.submit_generate(engine, settings, dataset_ref="pics", spec=_generation_spec(tiny_models_dir, 1))
    [status] = run_status(engine, settings, generated.run_id)
    assert status["throughput_unit"] == "images"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")},
           "DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": database_url}
    run = str(generated.run_id)
    for args in (["results", run], ["compare", run, run], ["export", run, "--output", str(tmp_path / "x.csv")]):
        out = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=120)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and "generate run" in lines[0], (args, out.stderr)
    assert not (tmp_path / "x.csv").exists()
