"""Secrets never printed: passwords in the database, broker and MLflow URLs stay out of every output and log."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy.engine import make_url

from difftpt_ops.db.session import get_engine
from tests.integration.test_hardening_support import private_redis
from tests.integration.test_jobs_support import (
    REPO_ROOT,
    add_dataset,
    free_port,
    run_state,
    start_worker,
    stop_worker,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]


def _cli(env: dict[str, str], *args: str) -> str:
    """`difftpt-ops ARGS` as a user runs it; returns stdout and stderr together."""
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    # The transcript names the command, not its arguments: those hold passwords on purpose.
    return f"$ {' '.join(args[:2])} -> {done.returncode}\n{done.stdout}{done.stderr}"


def test_passwords_stay_out_of_outputs_and_logs(tmp_path: Path, postgres_url: str, tiny_models_dir: Path) -> None:
    """db upgrade, config show, a worker running a run, mlflow sync against a dead server, the demo's refusal
    and the error paths (wrong broker password, unreachable database, mistyped URL): no password anywhere."""
    db_pw, broker_pw, mlflow_pw, wrong_pw = (f"{kind}-{uuid.uuid4().hex[:10]}" for kind in
                                             ("dbpw", "brokerpw", "mlflowpw", "wrongpw"))
    # Trust authentication ignores the password, so the URL works and still carries one.
    database_url = make_url(postgres_url).set(password=db_pw).render_as_string(hide_password=False)
    workspace = tmp_path / "ws"
    with private_redis(tmp_path, password=broker_pw) as redis:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFTPT_OPS_", "MLFLOW_"))}
        env.update({"DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": database_url,
                    "DIFFTPT_OPS_BROKER_URL": redis.url, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "250",
                    "DIFFTPT_OPS_MLFLOW_TRACKING_URI": f"http://tracker:{mlflow_pw}@127.0.0.1:{free_port()}",
                    "DIFFTPT_OPS_HEARTBEAT_INTERVAL_S": "0.5", "DIFFTPT_OPS_STALE_AFTER_S": "5",
                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"})
        outputs = [_cli(env, "db", "upgrade"), _cli(env, "config", "show"), _cli(env, "config", "show", "--json")]
        engine = get_engine(database_url)
        root = tmp_path / "images"
        relpaths = [f"class{i % 2}/{i}.png" for i in range(4)]
        for i, relpath in enumerate(relpaths):
            (root / relpath).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (60 * i, 20, 200 - 40 * i)).save(root / relpath)
        add_dataset(engine, "toy", 4, root=root, classes=2, relpaths=relpaths)
        log = tmp_path / "worker.log"
        worker = start_worker(env, log)
        try:
            wait_ready(log)
            outputs.append(_cli(env, "submit", "tune", "--dataset", "toy", "--method", "zeroshot", "--model",
                                str(tiny_models_dir / "clip"), "--pretrained", "none"))
            wait_for(lambda: run_state(engine, 1) not in {"None", "pending", "running"}, timeout=180,
                     what=f"the run to end after {outputs[-1]}")
            assert run_state(engine, 1) == "finished", outputs[-1]
            outputs.append(_cli(env, "mlflow", "sync"))
            outputs.append(_cli(env, "status", "1"))
        finally:
            stop_worker(worker)
        outputs.append(_cli(env, "demo"))
        outputs.append(_cli({**env, "DIFFTPT_OPS_BROKER_URL": f"redis://:{wrong_pw}@127.0.0.1:{redis.port}/0"},
                            "submit", "tune", "--dataset", "toy", "--method", "zeroshot", "--model", "x",
                            "--pretrained", "none"))
    outputs.append(_cli({**env, "DIFFTPT_OPS_DATABASE_URL": f"postgresql://postgres:{db_pw}@127.0.0.1:1/x"},
                        "data", "list"))
    outputs.append(_cli({**env, "DIFFTPT_OPS_DATABASE_URL": f"postgersql://postgres:{db_pw}@127.0.0.1/x"},
                        "data", "list"))
    outputs.append(_cli(env, "db", "upgrade", "--url", f"postgresql://postgres:{db_pw}@127.0.0.1:1/x"))
    everything = "\n".join(outputs) + log.read_text(errors="replace")
    for password in (db_pw, broker_pw, mlflow_pw, wrong_pw):
        assert password not in everything, everything
    # The URLs were printed, masked: the check above is not passing because nothing was said.
    assert "http://tracker:***@127.0.0.1" in everything and "postgres:***@127.0.0.1:1" in everything
    assert "mlflow sync -> 1" in everything and "$ demo -> 2" in everything
