"""The job commands through the CLI: JSON output, one-line errors with exit 2, nothing written on bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from cli.main import app
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Run
from difftpt_ops.services.reading import reporting
from tests.integration.test_jobs_support import add_dataset, make_settings, open_engine

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(cli_env: dict[str, str], workspace: Path, database_url: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(reporting, "report_progress", lambda *_: None)
    monkeypatch.setattr(reporting, "report_finished", lambda *_: None)
    monkeypatch.setattr(reporting, "_next_report", {})
    engine = open_engine(make_settings(workspace, database_url))
    add_dataset(engine, "toy", 30, failed=[4])
    return engine


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _runs(engine) -> int:  # type: ignore[no-untyped-def]
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Run)) or 0)


def test_submit_status_list_resume_as_json(engine) -> None:  # type: ignore[no-untyped-def]
    """submit runs the work in-process and reports it; status, runs list and resume agree."""
    code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "noop", "--shard-size", "8", "--json")
    assert code == 0, out
    submitted = json.loads(out)
    assert (submitted["state"], submitted["created"], submitted["shards_total"]) == ("finished_with_failures", True, 4)
    code, out = _invoke("status", str(submitted["run_id"]), "--json")
    status = json.loads(out)[0]
    assert (code, status["done"], status["failed"], status["pending"], status["shards"]) == (0, 29, 1, 0, {"done": 4})
    code, out = _invoke("runs", "list", "--json")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == [submitted["run_id"]]
    code, out = _invoke("resume", str(submitted["run_id"]), "--json")
    assert code == 0 and json.loads(out)["state"] == "finished_with_failures"
    code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "noop", "--json")
    assert code == 0 and json.loads(out)["created"] is False and json.loads(out)["shards_dispatched"] == 0
    code, out = _invoke("status", "--json")
    assert code == 0 and json.loads(out) == []  # no active run: status RUN shows a finished one


BAD_INPUTS = [
    (["submit", "tune", "--dataset", "nope", "--method", "noop"], "--dataset=nope"),
    (["submit", "tune", "--dataset", "toy", "--method", "sgd"], "--method=sgd"),
    (["submit", "tune", "--dataset", "toy", "--method", "tpt", "--set", "steps=-2"], "steps=-2"),
    (["submit", "tune", "--dataset", "toy", "--method", "tpt", "--set", "nosuch=1"], "--set=nosuch"),
    (["submit", "tune", "--dataset", "toy", "--method", "tpt", "--set", "steps"], "--set=steps"),
    (["submit", "tune", "--dataset", "toy", "--method", "noop", "--limit", "0"], "--limit=0"),
    (["submit", "tune", "--dataset", "toy", "--method", "noop", "--shard-size", "0"], "--shard-size=0"),
    (["submit", "tune", "--dataset", "toy", "--method", "noop", "--device", "gpu7"], "--device=gpu7"),
    (["submit", "tune", "--dataset", "toy", "--method", "zeroshot", "--generation", "1"], "--generation=1"),
    (["submit", "tune", "--dataset", "toy", "--method", "difftpt"], "submit generate --dataset toy"),
    (["submit", "generate", "--dataset", "toy", "--steps", "0"], "--steps=0"),
    (["submit", "tune", "--dataset", "toy", "--method", "tpt", "--order-seed", "3"], "--order-seed=3"),
    (["submit", "tune", "--dataset", "toy", "--method", "tda", "--orders", "2", "--dry-run"], "/--orders to estimate"),
    (["status", "seven"], "RUN=seven"),
    (["resume", "99"], "RUN=99"),
    (["cancel", "0"], "RUN=0"),
]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(engine) -> None:  # type: ignore[no-untyped-def]
    """Each bad argument is named with its value; no run is created."""
    for args, needle in BAD_INPUTS:
        code, out = _invoke(*args)
        assert code == 2, (args, out)
        assert needle in out and len(out.strip().splitlines()) == 1, (args, out)
    assert _runs(engine) == 0


def test_errors_name_options_the_command_takes(engine) -> None:  # type: ignore[no-untyped-def]
    """A CoOp checkpoint that is not there is refused at submit (run, dry run, sweep), before any row; `submit
    features`, which takes no --set, names --views when the generated images cannot serve its views."""
    from difftpt_ops.core.specs import GenerationSpec
    from difftpt_ops.db.tables import DatasetVersion, Sweep
    from difftpt_ops.services.running.generation import get_or_create_generation_config
    from tests.factories import make_run

    missing = "/nonexistent/coop.pth"
    tune = ("submit", "tune", "--dataset", "toy", "--method", "tpt")
    for args, needle in (((*tune, "--set", f"prompt.coop_checkpoint={missing}"), "--set prompt.coop_checkpoint="),
                         ((*tune, "--set", f"prompt.coop_checkpoint={missing}", "--dry-run"), "--set prompt.coop_"),
                         ((*tune, "--sweep", f"prompt.coop_checkpoint={missing},/x.pth"), "--sweep prompt.coop_")):
        code, out = _invoke(*args)
        assert code == 2 and needle in out and f"{missing}: no such file" in out, (args, out)
        assert len(out.strip().splitlines()) == 1, out
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Sweep)) == 0
    assert _runs(engine) == 0

    code, out = _invoke("submit", "features", "--dataset", "toy", "--views", "difftpt")
    assert code == 2 and "--views tpt" in out and "--set" not in out, out
    with session_scope(engine) as session:
        config = get_or_create_generation_config(session, GenerationSpec(model="tiny", revision=None, per_sample=2))
        version = session.scalars(select(DatasetVersion)).one()
        make_run(session, version, method="generate", kind="generate", generation_config_id=config.id)
    code, out = _invoke("submit", "features", "--dataset", "toy", "--views", "difftpt")
    assert code == 2 and "--views=difftpt: stores 63 generated views" in out and "--set" not in out, out
    assert len(out.strip().splitlines()) == 1 and _runs(engine) == 1  # the generation run made above


def test_unreachable_broker_fails_fast_before_writing(engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A broker that refuses connections is reported within seconds, naming the URL; nothing is planned."""
    monkeypatch.setenv("DIFFTPT_OPS_BROKER_URL", "redis://127.0.0.1:1/0")
    started = time.monotonic()
    code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "noop")
    assert code == 1 and "broker redis://127.0.0.1:1/0 is unreachable" in out
    assert time.monotonic() - started < 10 and _runs(engine) == 0
    monkeypatch.setenv("DIFFTPT_OPS_BROKER_URL", "amqp://guest:secret@127.0.0.1:1//")
    code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "noop")
    assert code == 1 and "amqp://guest:***@127.0.0.1:1//" in out and "secret" not in out


def test_worker_refuses_bad_setups(engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """No broker, a GPU on a machine without CUDA, or an unknown queue: exit 2 before starting anything."""
    code, out = _invoke("worker", "--gpus", "cpu")
    assert code == 2 and "DIFFTPT_OPS_BROKER_URL" in out
    monkeypatch.setenv("DIFFTPT_OPS_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, out = _invoke("worker", "--gpus", "0")
    assert code == 2 and "use --gpus cpu" in out
    code, out = _invoke("worker", "--gpus", "cpu", "--queues", "tune,render")
    assert code == 2 and "--queues=tune,render" in out


def test_a_local_generator_folder_has_no_revision(engine, tiny_models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A pipeline folder is the revision downloaded into it: without --revision it gets none (with v2.0, the
    hub default, every image would be made again under another config); --revision with a folder is refused."""
    folder = str(tiny_models_dir / "sd-image-variations")
    options = ("--dataset", "toy", "--model", folder, "--steps", "2", "--size", "64", "--per-sample", "2", "--dry-run")
    code, out = _invoke("submit", "generate", *options, "--json")
    assert code == 0, out
    code, out = _invoke("submit", "generate", *options, "--revision", "v2.0")
    assert code == 2 and "--revision=v2.0" in out and len(out.strip().splitlines()) == 1, out
    code, out = _invoke("submit", "generate", *options, "--revision", "none")
    assert code == 0, out
    assert _runs(engine) == 0


def test_status_watch_without_run_reports_the_final_state(engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """QA: `status --watch --json` (no RUN) stopped when its run ended without a line saying so: the last object
    of the run said `running`, `done` 0 (an online run stores its shard at the end), because the ended run is no
    longer an active run. Each run it showed gets one more object, in its final state."""
    import cli.status_cmds
    from difftpt_ops.db.tables import DatasetVersion
    from tests.factories import make_run

    with session_scope(engine) as session:
        version = session.scalars(select(DatasetVersion)).one()
        run_id = make_run(session, version, method="tpt", state="running").id

    def the_run_ends(_: float) -> None:
        with session_scope(engine) as session:
            session.get(Run, run_id).state = "finished"  # type: ignore[union-attr]

    monkeypatch.setattr(cli.status_cmds.time, "sleep", the_run_ends)
    code, out = _invoke("status", "--watch", "--json")
    assert code == 0, out
    states = [(line["run_id"], line["state"]) for line in map(json.loads, out.strip().splitlines())]
    assert states == [(run_id, "running"), (run_id, "finished")], states
    with session_scope(engine) as session:
        session.get(Run, run_id).state = "running"  # type: ignore[union-attr]
    code, out = _invoke("status", "--watch")  # plain lines (no shard: stopped); the last says how it ended
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and "state stopped" in lines[0] and "state finished" in lines[1], out
