"""A newcomer's first hour, through the CLI as a user types it (subprocesses, fresh workspaces).

1. The README's demo, then `runs list`, `results`, `compare`, `sql`, `status --json`.
2. The same path through a real `difftpt-ops worker` and Redis.
3. The errors a newcomer meets: each one line that says what to do, and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from difftpt_ops.config import load_settings
from difftpt_ops.data.demo_photos import write_demo_dataset
from difftpt_ops.services.demo import episodic_methods
from tests.integration.test_jobs_support import redis_db, start_worker, stop_worker, wait_for, wait_ready, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env(workspace: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")}
    env.update({"DIFFTPT_OPS_WORKSPACE": str(workspace), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`difftpt-ops ARGS` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def ok_json(env: dict[str, str], *args: str) -> object:
    done = cli(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_demo_then_what_the_readme_says(tmp_path: Path) -> None:
    """The demo completes offline; its runs can be listed, summarised, compared and queried."""
    env = _env(tmp_path / "ws")
    demo = cli(env, "demo", timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "MEANINGLESS" in demo.stdout and "mlflow ui" in demo.stdout and "views read" in demo.stdout
    runs = ok_json(env, "runs", "list")
    tune = {run["method"]: run for run in runs if run["kind"] == "tune"}
    # Every registered episodic method ran, the built-in ones and those added since.
    assert set(tune) == set(episodic_methods()) >= {"zeroshot", "tpt", "difftpt", "zero", "mta", "ctpt"}
    assert all(run["state"] == "finished" for run in runs)
    difftpt = ok_json(env, "results", str(tune["difftpt"]["run_id"]))
    assert difftpt["done"] == 27 and difftpt["failed"] == 0 and difftpt["pending"] == 0
    # results equals a direct count in the workspace database
    with sqlite3.connect(tmp_path / "ws" / "difftpt.db") as db:
        correct = db.execute("SELECT SUM(correct), COUNT(*) FROM predictions WHERE run_id = ?",
                             (tune["difftpt"]["run_id"],)).fetchone()
    assert difftpt["top1"] == pytest.approx(correct[0] / correct[1])
    paired = ok_json(env, "compare", str(tune["difftpt"]["run_id"]), str(tune["zeroshot"]["run_id"]))
    assert paired["paired_samples"] == 27
    assert paired["both_right"] + paired["only_a"] + paired["only_b"] + paired["both_wrong"] == 27
    rows = ok_json(env, "sql", "SELECT method, done FROM run_summary WHERE kind = 'tune' ORDER BY method")
    assert rows == [{"method": method, "done": 27} for method in sorted(tune)]
    assert ok_json(env, "status") == []  # every run finished: none is active
    status = ok_json(env, "status", str(tune["difftpt"]["run_id"]))
    assert {run["state"] for run in status} == {"finished"}
    # The generated views DiffTPT saw are rows too.
    with sqlite3.connect(tmp_path / "ws" / "difftpt.db") as db:
        kinds = dict(db.execute("SELECT kind, COUNT(*) FROM view_scores WHERE run_id = ? GROUP BY kind",
                                (tune["difftpt"]["run_id"],)).fetchall())
    assert kinds == {"original": 27, "conventional": 27 * 64, "generated": 27 * 16}
    # A second demo attaches to the stored runs and does no work twice.
    again = cli(env, "demo", "--json", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["run_ids"] == {m: run["run_id"] for m, run in tune.items()}


def test_worker_path_through_the_cli(tmp_path: Path, tiny_models_dir: Path) -> None:
    """data add, a real worker on Redis, submit tune, status --watch-like polling, results."""
    photos = tmp_path / "photos"
    write_demo_dataset(photos, crops_per_photo=1)
    with redis_db() as broker:
        workspace = tmp_path / "ws"
        env = _env(workspace, DIFFTPT_OPS_BROKER_URL=broker, DIFFTPT_OPS_MLFLOW_TRACKING_URI="none")
        assert cli(env, "data", "add", "photos", "--root", str(photos)).returncode == 0
        log = tmp_path / "worker.log"
        worker = start_worker(worker_env(load_settings(workspace, env=env), broker), log)
        try:
            wait_ready(log, 1, timeout=120)
            submitted = ok_json(env, "submit", "tune", "--dataset", "photos", "--method", "tpt", "--model",
                                str(tiny_models_dir / "clip"), "--pretrained", "none", "--set", "n_views=8",
                                "--shard-size", "3")
            assert not submitted["embedded"] and submitted["shards_dispatched"] == 3
            run_id = str(submitted["run_id"])
            wait_for(lambda: ok_json(env, "status", run_id)[0]["state"] == "finished", timeout=240,
                     what="the run to finish", interval=2)
        finally:
            assert stop_worker(worker) == 0
        summary = ok_json(env, "results", run_id)
        assert (summary["done"], summary["failed"], summary["pending"]) == (9, 0, 0)


@pytest.fixture
def photo_workspace(tmp_path: Path) -> tuple[dict[str, str], Path]:
    env = _env(tmp_path / "ws")
    photos = tmp_path / "photos"
    write_demo_dataset(photos, crops_per_photo=1)
    assert cli(env, "data", "add", "photos", "--root", str(photos)).returncode == 0
    return env, tmp_path


def _one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:")
    for needle in needles:
        assert needle in last, last


def test_errors_a_newcomer_meets(photo_workspace: tuple[dict[str, str], Path]) -> None:
    """No GPU, no weights offline, a missing root, a mistyped database URL, Redis down: one line each."""
    env, tmp = photo_workspace
    import torch

    if not torch.cuda.is_available():
        _one_line_error(cli(env, "worker", "--gpus", "0"), 2, "--gpus=0", "use --gpus cpu")
    _one_line_error(cli(env, "submit", "tune", "--dataset", "photos", "--method", "zeroshot", "--model", "ViT-B-16",
                        "--pretrained", "openai", "--limit", "2"), 1, "pass a local directory with --model")
    _one_line_error(cli(env, "data", "add", "more", "--root", str(tmp / "nowhere")), 2, "--root=", "does not exist")
    _one_line_error(cli({**env, "DIFFTPT_OPS_DATABASE_URL": "postgersql://postgres@127.0.0.1/test"}, "data", "list"),
                    2, "DIFFTPT_OPS_DATABASE_URL=postgersql://")
    _one_line_error(cli({**env, "DIFFTPT_OPS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/test"}, "data", "list"),
                    1, "unreachable", "DIFFTPT_OPS_DATABASE_URL")
    _one_line_error(cli({**env, "DIFFTPT_OPS_BROKER_URL": "redis://127.0.0.1:1/0"}, "submit", "tune", "--dataset",
                        "photos", "--method", "zeroshot", "--model", "x", "--pretrained", "none"), 1,
                    "broker redis://127.0.0.1:1/0 is unreachable")
