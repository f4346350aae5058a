"""What a submit would cost, before it is made: samples, shards, images, disk and time. Writes nothing.

Disk comes from the bytes per image measured on this deployment's stored images of the same size (or a
stated estimate when there are none); time from the seconds per sample (per image for generation) that
this deployment's earlier runs of the same kind recorded, or says that none exists yet.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import InputError
from difftpt_ops.core.specs import GenerationSpec
from difftpt_ops.core.status import ShardState
from difftpt_ops.db.tables import DatasetVersion, GeneratedImage, GenerationConfig, Run, Sample, Shard
from difftpt_ops.storage.artifacts import ArtifactStore

# With no image of this size stored yet: PNG of a generated photo takes about 1.6 bytes per pixel (measured on
# Stable Diffusion variations at 512 px, about 420 KB each); tiny random-model images compress far less well.
PNG_BYTES_PER_PIXEL_ESTIMATE = 1.6
_MEASURED_FILES = 200  # stat at most this many stored images to measure bytes per image
NO_GENERATION = "no generation for"  # how bytes_source begins when a DiffTPT run has no generation to read yet


@dataclass(frozen=True)
class Estimate:
    """A dry run's answer. `seconds` is for one worker; None when no earlier run of the kind exists."""

    kind: str
    method: str
    dataset: str
    samples: int  # in scope (after --limit)
    samples_to_do: int  # not finished by an existing run with the same settings
    existing_run_id: int | None
    shards_total: int
    shards_new: int
    images_to_generate: int
    images_read: int  # generated images a DiffTPT run reads
    bytes_per_image: int | None
    bytes_source: str  # "measured on N images of this config", "... of this size", or "estimate ..."
    disk_bytes: int
    seconds_per_unit: float | None  # per sample (tune) or per image (generate)
    seconds: float | None
    time_source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_tune(engine: Engine, settings: Settings, *, dataset_ref: str, method: str, model: str,
                  pretrained: str | None, generation_id: int | None, overrides: dict[str, Any] | None,
                  seed: int, limit: int | None, shard_size: int | None, device: str | None = None) -> Estimate:
    """The cost of `submit tune` with these arguments. Raises InputError/NotFoundError as submit would: the
    spec is resolved by the same function (`runs.resolve_tune_spec`), so the run a submit would attach to is
    found by its fingerprint."""
    from difftpt_ops.services.running.runs import default_shard_size, resolve_tune_spec, tune_choice
    from difftpt_ops.services.running.submit_checks import (
        check_execution_args,
        check_model_path,
        check_stream_blocks,
    )

    check_execution_args(limit=limit, shard_size=shard_size, device=device, seed=seed)
    choice = tune_choice(settings, method=method, overrides=overrides, model=model, pretrained=pretrained,
                         device=device)
    check_model_path(settings, choice.method.method, choice.model)  # as submit: a model that cannot exist
    with Session(engine) as session:
        plan = resolve_tune_spec(session, settings, choice, dataset_ref=dataset_ref, generation_id=generation_id,
                                 seed=seed, generation_missing_ok=True)
        version, config, method_spec = plan.version, plan.config, plan.spec.method
        check_stream_blocks(method_spec, limit=limit, shard_size=shard_size, n_samples=version.num_samples)
        samples = _in_scope(version, limit)
        existing = session.scalar(select(Run).where(Run.fingerprint == plan.spec.fingerprint()))
        n_generated = int(getattr(method_spec, "n_generated", 0) or 0)
        per_unit, time_source = _tune_seconds_per_sample(session, method_spec.method, model, choice.device)
        done, planned, shards = _progress(session, existing)
        to_do = samples - min(done, samples)
        new_shards = _new_shards(planned, samples, existing.shard_size if existing else shard_size or
                                 default_shard_size(settings, method_spec))
        size = int(config.spec.get("size", 0)) if config is not None else 0
        per_image, bytes_source = (_bytes_per_image(session, settings, config, size) if config is not None
                                   else (None, _no_images(n_generated, dataset_ref)))
    return Estimate(kind="tune", method=method_spec.method, dataset=_name(version, dataset_ref), samples=samples,
                    samples_to_do=to_do, existing_run_id=existing.id if existing else None,
                    shards_total=shards + new_shards, shards_new=new_shards, images_to_generate=0,
                    images_read=to_do * n_generated if config is not None else 0, bytes_per_image=per_image,
                    bytes_source=bytes_source, disk_bytes=0, seconds_per_unit=per_unit,
                    seconds=None if per_unit is None else per_unit * to_do, time_source=time_source)


def estimate_generate(engine: Engine, settings: Settings, *, dataset_ref: str, spec: GenerationSpec,
                      limit: int | None, shard_size: int | None, device: str | None = None) -> Estimate:
    """The cost of `submit generate` with this spec: images still missing, their disk and time."""
    from difftpt_ops.models.diffusion import resolve_dtype_name
    from difftpt_ops.services.running.generation import count_missing
    from difftpt_ops.services.running.submit_checks import (
        check_execution_args,
        generator_path_checked,
        resolve_run_device,
    )

    check_execution_args(limit=limit, shard_size=shard_size, device=device, seed=spec.seed)
    # As submit does: "auto" dtype resolved on the run's device, the pipeline's path checked and made absolute,
    # so the config is the one submit would use.
    spec = dataclasses.replace(spec, dtype=resolve_dtype_name(spec.dtype, resolve_run_device(settings, device)))
    spec = generator_path_checked(settings, spec)
    with Session(engine) as session:
        version = _version(session, dataset_ref)
        samples = _in_scope(version, limit)
        config = session.scalar(select(GenerationConfig).where(GenerationConfig.fingerprint == spec.fingerprint()))
        hashes = list(session.scalars(select(Sample.content_hash).where(
            Sample.dataset_version_id == version.id, Sample.index < samples).order_by(Sample.index)))
        missing = (count_missing(session, config_id=config.id, source_hashes=hashes, per_sample=spec.per_sample)
                   if config is not None else len(dict.fromkeys(hashes)) * spec.per_sample)
        existing = _existing_generate_run(session, version, spec)
        done, planned, shards = _progress(session, existing)
        new_shards = _new_shards(planned, samples, existing.shard_size if existing else shard_size or
                                 settings.shard_size)
        per_image, bytes_source = _bytes_per_image(session, settings, config, spec.size)
        per_unit, time_source = _generate_seconds_per_image(session, spec)
    return Estimate(kind="generate", method="generate", dataset=_name(version, dataset_ref), samples=samples,
                    samples_to_do=samples - min(done, samples), existing_run_id=existing.id if existing else None,
                    shards_total=shards + new_shards, shards_new=new_shards, images_to_generate=missing,
                    images_read=0, bytes_per_image=per_image, bytes_source=bytes_source,
                    disk_bytes=missing * (per_image or 0), seconds_per_unit=per_unit,
                    seconds=None if per_unit is None else per_unit * missing, time_source=time_source)


def _no_images(n_generated: int, dataset_ref: str) -> str:
    if n_generated == 0:
        return "no generated images"
    return (f"{NO_GENERATION} {dataset_ref} yet: `difftpt-ops submit generate --dataset {dataset_ref}` first "
            f"({n_generated} images per sample)")


def _version(session: Session, dataset_ref: str) -> DatasetVersion:
    from difftpt_ops.services.datasets import resolve_dataset_version

    _, version = resolve_dataset_version(session, dataset_ref)
    if version.num_samples < 1:
        raise InputError("--dataset", dataset_ref, "has no samples")
    return version


def _name(version: DatasetVersion, dataset_ref: str) -> str:
    return f"{dataset_ref.partition('@')[0]}@{version.version}"


def _in_scope(version: DatasetVersion, limit: int | None) -> int:
    return version.num_samples if limit is None else min(limit, version.num_samples)


def _existing_generate_run(session: Session, version: DatasetVersion, spec: GenerationSpec) -> Run | None:
    for run in session.scalars(select(Run).where(Run.kind == "generate", Run.dataset_version_id == version.id)):
        if run.spec.get("generation") == spec.to_dict():
            return run
    return None


def _progress(session: Session, run: Run | None) -> tuple[int, int, int]:
    """(samples finished, samples planned, shards) of an existing run; zeros without one."""
    if run is None:
        return 0, 0, 0
    done, shards = session.execute(select(
        func.coalesce(func.sum(Shard.samples_done + Shard.samples_failed), 0), func.count(Shard.id)
    ).where(Shard.run_id == run.id)).one()
    return int(done), run.num_samples, int(shards)


def _new_shards(planned: int, target: int, shard_size: int) -> int:
    return math.ceil(max(0, target - planned) / shard_size)


def _bytes_per_image(session: Session, settings: Settings, config: GenerationConfig | None,
                     size: int) -> tuple[int | None, str]:
    """Mean file size of stored images of this config, else of any config of the same size, else an estimate."""
    same_config = [config.id] if config is not None else []
    same_size = [c.id for c in session.scalars(select(GenerationConfig)) if int(c.spec.get("size", -1)) == size]
    store = ArtifactStore(settings.artifact_root)
    for ids, what in ((same_config, "this config"), (same_size, f"{size} px images")):
        if not ids:
            continue
        keys = list(session.scalars(select(GeneratedImage.artifact_key).where(
            GeneratedImage.generation_config_id.in_(ids)).limit(_MEASURED_FILES)))
        sizes = [path.stat().st_size for path in (store.path(k) for k in keys) if path.is_file()]
        if sizes:
            return round(sum(sizes) / len(sizes)), f"measured on {len(sizes)} stored image(s) of {what}"
    if size <= 0:
        return None, "no generated images"
    estimate = round(size * size * PNG_BYTES_PER_PIXEL_ESTIMATE)
    return estimate, (f"estimate: no {size} px image stored yet; PNG at about {PNG_BYTES_PER_PIXEL_ESTIMATE} "
                      "bytes per pixel")


def _tune_seconds_per_sample(session: Session, method: str, model: str, device: str) -> tuple[float | None, str]:
    """Seconds per sample over finished shards of earlier tune runs of this method with this model on this kind of
    device. Runs of other models or devices are named, not used: their speed says little about this one's."""
    counted = func.sum(Shard.samples_done + Shard.samples_failed)
    totals = session.execute(select(Run.id, func.sum(Shard.seconds), counted).join(Shard, Shard.run_id == Run.id)
                             .where(Run.kind == "tune", Run.method == method, Shard.state == ShardState.DONE)
                             .group_by(Run.id)).all()  # not by spec: PostgreSQL cannot group a json column
    specs = dict(session.execute(select(Run.id, Run.spec).where(Run.id.in_([t[0] for t in totals]))).tuples().all())
    rows = [(specs[run_id], float(s or 0), int(n or 0)) for run_id, s, n in totals if s and n]
    same = [(s, n) for spec, s, n in rows
            if (spec.get("model") or {}).get("name") == model and spec.get("device", "cpu") == device]
    if same:
        seconds, samples = sum(s for s, _ in same), sum(n for _, n in same)
        return seconds / samples, (f"measured: {samples} sample(s) of earlier {method} runs with {model} on "
                                   f"{device} on this deployment")
    if rows:
        seconds, samples = sum(s for _, s, _ in rows), sum(n for _, _, n in rows)
        return None, (f"none yet for {method} with {model} on {device}; other models or devices took "
                      f"{seconds / samples:.3g} s per sample over {samples} sample(s), which says little about it")
    return None, f"none yet: no finished {method} run on this deployment to measure"


def _generate_seconds_per_image(session: Session, spec: GenerationSpec) -> tuple[float | None, str]:
    """Seconds per image over stored images of configs with the same model, steps and size."""
    keys = ("model", "steps", "size")
    similar = [c.id for c in session.scalars(select(GenerationConfig))
               if all(c.spec.get(k) == getattr(spec, k) for k in keys)]
    if similar:
        seconds, count = session.execute(select(func.sum(GeneratedImage.seconds), func.count(GeneratedImage.seconds))
                                         .where(GeneratedImage.generation_config_id.in_(similar))).one()
        if count and seconds:
            return float(seconds) / int(count), (f"measured: {count} image(s) generated earlier with this model, "
                                                 f"{spec.steps} steps, {spec.size} px on this deployment")
    return None, "none yet: no image generated with this model, step count and size on this deployment"
