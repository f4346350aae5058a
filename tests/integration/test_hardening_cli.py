"""One line, the right exit code, nothing half-made: the bad inputs of the hardening issue, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from difftpt_ops.db.session import dispose_engines, get_engine, session_scope, upgrade
from tests.factories import make_dataset_version, make_predictions, make_run
from tests.integration.test_jobs_support import REPO_ROOT

pytestmark = pytest.mark.integration


def _env(workspace: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")}
    env.update({"DIFFTPT_OPS_WORKSPACE": str(workspace), "HF_HUB_OFFLINE": "1", "COLUMNS": "250",
                "PYTHONPATH": str(REPO_ROOT), "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none"})
    env.update(extra)
    return env


def _fails(env: dict[str, str], code: int, *args: str, says: str = "") -> str:
    """Run `difftpt-ops ARGS`; assert exit `code` and one line on stderr that names the argument; return it."""
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1, f"{args}: {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr and says in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def seeded_workspace(tmp_path: Path) -> Path:
    """A workspace whose database holds a finished run 1 with predictions, and a dataset `pics` of 4 images."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    engine = get_engine(f"sqlite:///{workspace / 'difftpt.db'}")
    upgrade(engine)
    with session_scope(engine) as session:
        make_predictions(session, make_run(session, make_dataset_version(session, 4, 2)), [True, False, True, True])
    dispose_engines()
    root = tmp_path / "pics"
    for i in range(4):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(root / f"c{i % 2}" / f"{i}.png")
    done = subprocess.run([sys.executable, "-m", "cli.main", "data", "add", "pics", "--root", str(root)],
                          env=_env(workspace), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return workspace


def test_bad_database_urls_at_db_upgrade(tmp_path: Path) -> None:
    """Malformed: exit 2 naming --url; a folder that cannot exist: exit 2, nothing created; unreachable: exit 1."""
    env = _env(tmp_path / "ws")
    _fails(env, 2, "db", "upgrade", "--url", "bogus", says="--url=bogus")
    _fails(env, 2, "db", "upgrade", "--url", "postgresql://u@h:notaport/x", says="not a database URL")
    (tmp_path / "a-file").write_text("x")
    _fails(env, 2, "db", "upgrade", "--url", f"sqlite:///{tmp_path / 'a-file' / 'x.db'}", says="does not exist")
    # A mistyped folder is not created (it would hold a new, empty database every command then reads).
    _fails(env, 2, "db", "upgrade", "--url", f"sqlite:///{tmp_path / 'typo' / 'dir' / 'x.db'}",
           says="typo/dir does not exist (it is not created")
    _fails(env, 2, "db", "upgrade", "--url", f"sqlite:///{tmp_path}", says="names a folder")
    _fails(env, 1, "db", "upgrade", "--url", "postgresql://postgres@127.0.0.1:1/x", says="unreachable")
    _fails(_env(tmp_path / "ws", DIFFTPT_OPS_DATABASE_URL="mysql+nodriver://x/y"), 2, "db", "upgrade",
           says="DIFFTPT_OPS_DATABASE_URL=")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_files_where_folders_belong(tmp_path: Path) -> None:
    """make-tiny onto a file, --workspace or DIFFTPT_OPS_WORKSPACE naming a file: exit 2, the file untouched."""
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    env = _env(tmp_path / "ws")
    _fails(env, 2, "models", "make-tiny", str(a_file), says="is a file")
    _fails(env, 2, "--workspace", str(a_file), "data", "list", says=f"--workspace={a_file}")
    _fails(_env(a_file), 2, "data", "list", says=f"DIFFTPT_OPS_WORKSPACE={a_file}")
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_brokers_unknown_or_refusing(seeded_workspace: Path) -> None:
    """An unknown scheme is refused when settings are read; a wrong AMQP password at submit: exit 1, no run."""
    _fails(_env(seeded_workspace, DIFFTPT_OPS_BROKER_URL="kafka://h:9092"), 2, "config", "show",
           says="DIFFTPT_OPS_BROKER_URL=kafka://h:9092: unknown broker scheme")
    wrong = _env(seeded_workspace, DIFFTPT_OPS_BROKER_URL="amqp://guest:not-the-password@127.0.0.1:5672//")
    line = _fails(wrong, 1, "submit", "tune", "--dataset", "pics", "--method", "zeroshot", "--model", "x",
                  "--pretrained", "none", says="refused the login")
    assert "not-the-password" not in line
    listed = subprocess.run([sys.executable, "-m", "cli.main", "runs", "list", "--json"], env=_env(seeded_workspace),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [1]


def test_export_to_a_folder_a_missing_folder_or_an_unwritable_path(seeded_workspace: Path, tmp_path: Path) -> None:
    """No folder is created and no partial file left; a good path still works."""
    env = _env(seeded_workspace)
    _fails(env, 2, "export", "1", "--format", "csv", "--output", str(tmp_path), says="is a folder")
    _fails(env, 2, "export", "1", "--format", "csv", "--output", str(tmp_path / "new" / "x.csv"), says="does not exist")
    _fails(env, 2, "export", "1", "--format", "csv", "--output", "/proc/x.csv", says="--output=/proc/x.csv")
    assert not (tmp_path / "new").exists()
    done = subprocess.run([sys.executable, "-m", "cli.main", "export", "1", "--format", "csv", "--output",
                           str(tmp_path / "x.csv")], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "x.csv").read_text().splitlines()) == 5
    assert json.loads((tmp_path / "x.csv.provenance.json").read_text())["difftpt"]["run_id"] == 1
    assert "x.csv.provenance.json" in done.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_option_values_that_mean_nothing(tmp_path: Path) -> None:
    """sql --timeout 0 / --max-rows -1, import-generated --seed -5, worker --loglevel LOUD: exit 2, no database."""
    workspace = tmp_path / "ws"
    env = _env(workspace)
    _fails(env, 2, "sql", "SELECT 1", "--timeout", "0", says="--timeout=0")
    _fails(env, 2, "sql", "SELECT 1", "--max-rows", "-1", says="--max-rows=-1")
    _fails(env, 2, "data", "import-generated", "--dataset", "x", "--root", str(tmp_path), "--seed", "-5",
           says="--seed=-5")
    _fails(_env(workspace, DIFFTPT_OPS_BROKER_URL="redis://127.0.0.1:1/0"), 2, "worker", "--gpus", "cpu",
           "--loglevel", "LOUD", says="--loglevel=LOUD")
    assert not workspace.exists()


def test_embedded_submit_exits_1_when_the_run_ends_failed() -> None:
    """The README's exit codes: a run that ended failed is exit 1, a finished one exit 0."""
    import typer

    from cli.jobs import _print_submit
    from difftpt_ops.services.running.runs import SubmitResult

    fields = {name: None for name in SubmitResult.__dataclass_fields__}
    base = {**fields, "run_id": 3, "created": True, "kind": "tune", "method": "tpt", "num_samples": 4,
            "shards_total": 1, "shards_new": 1, "shards_dispatched": 0, "embedded": True}
    with pytest.raises(typer.Exit) as caught:
        _print_submit(SubmitResult(**{**base, "state": "failed"}), False)
    assert caught.value.exit_code == 1
    _print_submit(SubmitResult(**{**base, "state": "finished"}), False)


def test_a_bad_model_or_device_at_submit_leaves_no_run(seeded_workspace: Path, tmp_path: Path) -> None:
    """Embedded submit: an unknown model name, a folder that is no model, a missing CUDA: exit 2, no new run."""
    import torch

    env = _env(seeded_workspace)
    submit = ("submit", "tune", "--dataset", "pics", "--method", "zeroshot", "--pretrained", "none")
    _fails(env, 2, *submit, "--model", "NoSuchArch", says="--model=NoSuchArch")
    (tmp_path / "not-a-model").mkdir()
    _fails(env, 2, *submit, "--model", str(tmp_path / "not-a-model"), says="not an open_clip model directory")
    if not torch.cuda.is_available():  # the message says CUDA is missing (it used to say "go online")
        line = _fails(env, 2, *submit, "--model", "ViT-B-16", "--device", "cuda", says="--device=cuda")
        assert "CUDA" in line and "online" not in line
    listed = subprocess.run([sys.executable, "-m", "cli.main", "runs", "list", "--json"], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [1]


def test_status_masks_a_url_password_in_a_stored_shard_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard's stored error may quote a URL: `status` prints it masked, in its table and in --json."""
    from typer.testing import CliRunner

    from cli.main import app
    from difftpt_ops.db.session import dispose_engines, get_engine, session_scope, upgrade
    from tests.factories import make_dataset_version, make_run, make_shard

    engine = get_engine(f"sqlite:///{tmp_path / 'difftpt.db'}")
    upgrade(engine)
    with session_scope(engine) as session:
        run = make_run(session, make_dataset_version(session, 4, 2), state="failed")
        make_shard(session, run, state="failed",
                   error="Traceback ...\nOperationalError: cannot reach postgresql://me:hunter2-pw@db/x")
    dispose_engines()
    monkeypatch.setenv("DIFFTPT_OPS_WORKSPACE", str(tmp_path))
    for extra in ([], ["--json"]):
        out = CliRunner().invoke(app, ["status", "1", *extra])
        assert out.exit_code == 0, out.output
        assert "hunter2-pw" not in out.output and "postgresql://me:***@db/x" in out.output
