"""The tables and the migrations describe the same schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from difftpt_ops.core.method_specs import method_spec_from, resolve_for_dataset
from difftpt_ops.db import tables  # noqa: F401
from difftpt_ops.db.base import Base
from difftpt_ops.db.session import SCHEMA_HEAD, current_revision, get_engine, head_revision, session_scope, upgrade
from difftpt_ops.db.tables import Run
from tests.factories import make_dataset_version, make_run

pytestmark = pytest.mark.integration


def test_migrations_match_tables(database_url: str) -> None:
    """Alembic's autogenerate comparison finds no difference after upgrading to head."""
    engine = get_engine(database_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_is_idempotent_and_creates_every_table(database_url: str) -> None:
    """A second upgrade changes nothing and every mapped table exists."""
    engine = get_engine(database_url)
    upgrade(engine)
    upgrade(engine)
    names = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= names


def test_schema_head_constant_is_alembic_head() -> None:
    """Opening a database compares against SCHEMA_HEAD; it must name the newest migration."""
    assert SCHEMA_HEAD == head_revision()


def test_0009_names_older_runs_as_table_does(database_url: str) -> None:
    """Runs stored under 0008 with the old `settings` words (plain-default differences, comma-separated) read
    as `table` names their row after the upgrade: a ZERO run from before `vote` existed says vote=argmax, a
    TDA run at its dataset's defaults says nothing, a TPT run with two steps says steps=2."""
    engine = get_engine(database_url)
    upgrade(engine, "0008")
    specs = {
        "zero": {"method": "zero"},
        "tda": resolve_for_dataset(method_spec_from("tda"), "imagefolder").to_dict(),  # as submit stores it
        "tpt": {"method": "tpt", "steps": 2},
    }
    with session_scope(engine) as session:
        version = make_dataset_version(session)
        ids = {}
        for method, method_spec in specs.items():
            spec = {"kind": "tune", "method": method_spec, "model": {"name": "ViT-B-16"}, "seed": 0}
            ids[method] = make_run(session, version, method=method, spec=spec, settings="stale, words").id
        generation = make_run(session, version, method="generate", kind="generate", settings="keep").id
    upgrade(engine)
    with session_scope(engine) as session:
        stored = dict(session.execute(select(Run.id, Run.settings)).all())
    assert stored[ids["zero"]] == "vote=argmax"
    assert stored[ids["tda"]] == ""
    assert stored[ids["tpt"]] == "steps=2"
    assert stored[generation] == "keep"
