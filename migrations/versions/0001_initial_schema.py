"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-27 23:50:11.647321
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('format', sa.String(length=40), nullable=False),
    sa.Column('root', sa.Text(), nullable=False),
    sa.Column('class_names', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('name', name=op.f('uq_datasets_name'))
    )
    op.create_table('generation_configs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_generation_configs')),
    sa.UniqueConstraint('fingerprint', name=op.f('uq_generation_configs_fingerprint'))
    )
    op.create_table('dataset_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('parent_version_id', sa.Integer(), nullable=True),
    sa.Column('subset_size', sa.Integer(), nullable=True),
    sa.Column('subset_seed', sa.Integer(), nullable=True),
    sa.Column('num_samples', sa.Integer(), nullable=False),
    sa.Column('num_failed', sa.Integer(), nullable=False),
    sa.Column('mlflow_experiment_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_dataset_versions_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_version_id'], ['dataset_versions.id'], name=op.f('fk_dataset_versions_parent_version_id_dataset_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dataset_versions')),
    sa.UniqueConstraint('dataset_id', 'fingerprint', name=op.f('uq_dataset_versions_dataset_id_fingerprint')),
    sa.UniqueConstraint('dataset_id', 'version', name=op.f('uq_dataset_versions_dataset_id_version'))
    )
    with op.batch_alter_table('dataset_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dataset_versions_fingerprint'), ['fingerprint'], unique=False)

    op.create_table('generated_images',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('generation_config_id', sa.Integer(), nullable=False),
    sa.Column('source_hash', sa.String(length=64), nullable=False),
    sa.Column('variant_index', sa.Integer(), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('artifact_key', sa.Text(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('imported', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['generation_config_id'], ['generation_configs.id'], name=op.f('fk_generated_images_generation_config_id_generation_configs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_generated_images')),
    sa.UniqueConstraint('generation_config_id', 'source_hash', 'variant_index', name=op.f('uq_generated_images_generation_config_id_source_hash_variant_index'))
    )
    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('method', sa.String(length=40), nullable=False),
    sa.Column('dataset_version_id', sa.Integer(), nullable=False),
    sa.Column('generation_config_id', sa.Integer(), nullable=True),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('num_samples', sa.Integer(), nullable=False),
    sa.Column('shard_size', sa.Integer(), nullable=False),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
    sa.Column('mlflow_experiment_id', sa.String(length=64), nullable=True),
    sa.Column('mlflow_sync_needed', sa.Boolean(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['dataset_version_id'], ['dataset_versions.id'], name=op.f('fk_runs_dataset_version_id_dataset_versions')),
    sa.ForeignKeyConstraint(['generation_config_id'], ['generation_configs.id'], name=op.f('fk_runs_generation_config_id_generation_configs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs')),
    sa.UniqueConstraint('fingerprint', name=op.f('uq_runs_fingerprint'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index('ix_runs_dataset_version_method', ['dataset_version_id', 'method'], unique=False)
        batch_op.create_index(batch_op.f('ix_runs_state'), ['state'], unique=False)

    op.create_table('samples',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('dataset_version_id', sa.Integer(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('relpath', sa.Text(), nullable=False),
    sa.Column('label', sa.Integer(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_version_id'], ['dataset_versions.id'], name=op.f('fk_samples_dataset_version_id_dataset_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_samples')),
    sa.UniqueConstraint('dataset_version_id', 'index', name=op.f('uq_samples_dataset_version_id_index'))
    )
    with op.batch_alter_table('samples', schema=None) as batch_op:
        batch_op.create_index('ix_samples_content_hash', ['content_hash'], unique=False)
        batch_op.create_index('ix_samples_version_label', ['dataset_version_id', 'label'], unique=False)

    op.create_table('predictions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('sample_id', sa.BigInteger(), nullable=False),
    sa.Column('sample_index', sa.Integer(), nullable=False),
    sa.Column('label', sa.Integer(), nullable=False),
    sa.Column('pred', sa.Integer(), nullable=False),
    sa.Column('top5', sa.JSON(), nullable=False),
    sa.Column('correct', sa.Boolean(), nullable=False),
    sa.Column('top5_correct', sa.Boolean(), nullable=False),
    sa.Column('zeroshot_pred', sa.Integer(), nullable=True),
    sa.Column('zeroshot_correct', sa.Boolean(), nullable=True),
    sa.Column('entropy_before', sa.Float(), nullable=True),
    sa.Column('entropy_after', sa.Float(), nullable=True),
    sa.Column('confidence_before', sa.Float(), nullable=True),
    sa.Column('confidence_after', sa.Float(), nullable=True),
    sa.Column('n_views', sa.Integer(), nullable=False),
    sa.Column('n_kept', sa.Integer(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_predictions_run_id_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sample_id'], ['samples.id'], name=op.f('fk_predictions_sample_id_samples'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_predictions')),
    sa.UniqueConstraint('run_id', 'sample_id', name=op.f('uq_predictions_run_id_sample_id'))
    )
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index('ix_predictions_run_label', ['run_id', 'label'], unique=False)
        batch_op.create_index(batch_op.f('ix_predictions_sample_id'), ['sample_id'], unique=False)

    op.create_table('sample_errors',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('sample_id', sa.BigInteger(), nullable=False),
    sa.Column('sample_index', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_sample_errors_run_id_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sample_id'], ['samples.id'], name=op.f('fk_sample_errors_sample_id_samples'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sample_errors')),
    sa.UniqueConstraint('run_id', 'sample_id', name=op.f('uq_sample_errors_run_id_sample_id'))
    )
    op.create_table('shards',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('start', sa.Integer(), nullable=False),
    sa.Column('stop', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('samples_done', sa.Integer(), nullable=False),
    sa.Column('samples_failed', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('gpu', sa.String(length=40), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_shards_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_shards')),
    sa.UniqueConstraint('run_id', 'index', name=op.f('uq_shards_run_id_index'))
    )
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.create_index('ix_shards_run_state', ['run_id', 'state'], unique=False)

    op.create_table('view_scores',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('sample_id', sa.BigInteger(), nullable=False),
    sa.Column('view_index', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('cosine', sa.Float(), nullable=True),
    sa.Column('entropy', sa.Float(), nullable=False),
    sa.Column('kept', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_view_scores_run_id_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sample_id'], ['samples.id'], name=op.f('fk_view_scores_sample_id_samples'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'sample_id', 'view_index', name=op.f('pk_view_scores'))
    )


def downgrade() -> None:
    op.drop_table('view_scores')
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.drop_index('ix_shards_run_state')

    op.drop_table('shards')
    op.drop_table('sample_errors')
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_predictions_sample_id'))
        batch_op.drop_index('ix_predictions_run_label')

    op.drop_table('predictions')
    with op.batch_alter_table('samples', schema=None) as batch_op:
        batch_op.drop_index('ix_samples_version_label')
        batch_op.drop_index('ix_samples_content_hash')

    op.drop_table('samples')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_state'))
        batch_op.drop_index('ix_runs_dataset_version_method')

    op.drop_table('runs')
    op.drop_table('generated_images')
    with op.batch_alter_table('dataset_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dataset_versions_fingerprint'))

    op.drop_table('dataset_versions')
    op.drop_table('generation_configs')
    op.drop_table('datasets')
