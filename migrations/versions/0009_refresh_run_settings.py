"""runs.settings: recomputed for every tuning run, as `table` names the run's row

`settings` (and the `run_summary` column that shows it) used to hold the method settings that differ from
the method's plain defaults, comma-separated. Runs submitted since hold the run's configuration as `table`
names its row: what differs from the method's defaults for the run's dataset, space-separated, including
the values a run stored before an option existed used (`zero vote=argmax`). This data migration rewrites
the column of the older runs the same way, so SQL over `run_summary` groups runs as `table` does. No schema
change; the downgrade leaves the recomputed values (they remain correct).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_RUNS = sa.table("runs", sa.column("id", sa.Integer), sa.column("kind", sa.String), sa.column("spec", sa.JSON),
                 sa.column("settings", sa.Text), sa.column("dataset_version_id", sa.Integer))
_VERSIONS = sa.table("dataset_versions", sa.column("id", sa.Integer), sa.column("dataset_id", sa.Integer))
_DATASETS = sa.table("datasets", sa.column("id", sa.Integer), sa.column("format", sa.String))


def upgrade() -> None:
    # The words come from the code that names table rows: a second formulation here could drift from it.
    from difftpt_ops.services.reading.configurations import configuration

    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_RUNS.c.id, _RUNS.c.spec, _RUNS.c.settings, _DATASETS.c.format)
        .join(_VERSIONS, _VERSIONS.c.id == _RUNS.c.dataset_version_id)
        .join(_DATASETS, _DATASETS.c.id == _VERSIONS.c.dataset_id)
        .where(_RUNS.c.kind == "tune")).all()
    for run_id, spec, stored, dataset_format in rows:
        words = configuration(spec, dataset_format)
        if words != stored:
            bind.execute(sa.update(_RUNS).where(_RUNS.c.id == run_id).values(settings=words))


def downgrade() -> None:
    pass  # data only: the recomputed words stay valid under 0008's schema
