"""Shared fixtures: isolated workspaces, SQLite and PostgreSQL databases, tiny models.

PostgreSQL tests use a fresh database on the server named by DIFFTPT_OPS_TEST_POSTGRES_URL
(default: postgresql+psycopg://postgres@127.0.0.1:5432/test), created and dropped per test.
Redis tests use DIFFTPT_OPS_TEST_REDIS_URL (default redis://127.0.0.1:6379) with a database number
chosen per test run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# No hub access in tests: a missing local model must fail fast, not retry for a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
for _name in list(os.environ):
    if _name.startswith("DIFFTPT_OPS_") and not _name.startswith("DIFFTPT_OPS_TEST_"):
        del os.environ[_name]

POSTGRES_ADMIN_URL = os.environ.get(
    "DIFFTPT_OPS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DIFFTPT_OPS_TEST_REDIS_URL", "redis://127.0.0.1:6379")


# Marks what this pytest session starts (workers inherit it: their environments are copies of this one), so
# the fixture below kills only this session's leftovers, never the workers of another session on the machine.
SESSION_MARK = "DIFFTPT_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex


def _worker_processes() -> set[int]:
    """Pids of `difftpt-ops worker` supervisors and their Celery children started by this pytest session."""
    found = set()
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not (b"workers.celery_app" in argv or (b"cli.main" in argv and b"worker" in argv)):
                continue
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(autouse=True)
def no_worker_outlives_its_test() -> Iterator[None]:
    """A worker a test started must not live on: still consuming from a reused Redis database number, it
    would take the next test's messages and answer them from the wrong database."""
    if not Path("/proc").is_dir():
        yield
        return
    before = _worker_processes()
    yield
    deadline = time.monotonic() + 10
    while (left := _worker_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        warnings.warn(f"killed worker processes a test left running: {sorted(left)}", stacklevel=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where CUDA exists; everything else always runs."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    # DIFFTPT_OPS_TEST_GPU_DEVICE=cpu rehearses the tier on the CPU (tests/gpu/conftest.py).
    if has_cuda or os.environ.get("DIFFTPT_OPS_TEST_GPU_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


def _create_postgres_database() -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"difftpt_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_postgres_database(url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from difftpt_ops.db.session import dispose_engines

    dispose_engines()
    name = make_url(url).database
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    url = _create_postgres_database()
    try:
        yield url
    finally:
        _drop_postgres_database(url)


@contextmanager
def scratch_database(backend: str, directory: Path) -> Iterator[str]:
    """A fresh database URL: a SQLite file in `directory`, or a new PostgreSQL database dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'difftpt.db'}"
        from difftpt_ops.db.session import dispose_engines

        dispose_engines()
        return
    url = _create_postgres_database()
    try:
        yield url
    finally:
        _drop_postgres_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, workspace: Path) -> Iterator[str]:
    """The same test on the embedded SQLite file and on a fresh PostgreSQL database."""
    with scratch_database(request.param, workspace) as url:
        yield url


@pytest.fixture
def cli_env(workspace: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for CLI tests: a fresh workspace and the parametrised database."""
    env = {"DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": database_url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`difftpt-ops models make-tiny` output, built once per test session."""
    from difftpt_ops.models.tiny import make_tiny_models

    directory = tmp_path_factory.mktemp("tiny-models")
    make_tiny_models(directory)
    return directory


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and OpenMP spinning on a busy 2-core box costs up to 20x."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
