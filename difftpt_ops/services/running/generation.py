"""Stable Diffusion image variations as a cache keyed by content: an image is never generated twice.

A generation config is a `GenerationSpec` stored once by fingerprint. Each image has a file in the
artifact store under `artifact_key(...)` and a `generated_images` row, unique per (config, source hash,
variant index). Always file first (atomic), row after, one commit per batch: a killed worker loses at
most one batch, never leaves a row without its file, and a file left without its row is adopted on
the next attempt instead of being generated again. API for the run machinery:

    with session_scope(engine) as session:
        config = get_or_create_generation_config(session, spec)
    generator = SampleGenerator(spec, device=settings.device)       # the pipeline loads on first need
    store = ArtifactStore(settings.artifact_root)
    for each sample:
        try:
            new = generator.generate_sample(engine, config_id=config.id, source_path=..., source_hash=...,
                                            store=store, batch_size=8, progress=bar.advance)
        except SampleError as exc:
            record the failure, go on

DiffTPT runs then read `find_generated_paths(session, store, config_id=..., source_hash=..., limit=63)`.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError
from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from difftpt_ops.core.errors import NotFoundError, SampleError
from difftpt_ops.core.specs import GenerationSpec, canonical_json, fingerprint_of
from difftpt_ops.data.images import load_rgb
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import DatasetVersion, GeneratedImage, GenerationConfig, Sample
from difftpt_ops.db.writes import insert_ignore
from difftpt_ops.models.diffusion import (
    iter_variation_batches,
    load_variation_pipeline,
    resolve_device,
    resolve_dtype_name,
    variant_seed,
)
from difftpt_ops.services.running.processors import MODELS, execution_device
from difftpt_ops.storage.artifacts import IMAGE_SUFFIX, Artifact, ArtifactStore, encode_png

if TYPE_CHECKING:
    from diffusers import StableDiffusionImageVariationPipeline

    from difftpt_ops.config import Settings

ProgressCallback = Callable[[int], None]
"""Called with the number of images newly registered, after each committed batch."""

IMPORTED_SEED = -1  # seed column of imported images: the reference generator used no seed
_REFERENCE_NAME = re.compile(r"^(?P<stem>.+)_(?P<index>\d+)\.(?P<ext>jpe?g|png)$", re.IGNORECASE)


def get_or_create_generation_config(session: Session, spec: GenerationSpec) -> GenerationConfig:
    """The stored config of `spec` (by fingerprint), created if new. Safe under concurrent callers."""
    fingerprint = spec.fingerprint()
    insert_ignore(session, GenerationConfig, [{"fingerprint": fingerprint, "spec": spec.to_dict()}])
    return session.scalars(select(GenerationConfig).where(GenerationConfig.fingerprint == fingerprint)).one()


def spec_of(config: GenerationConfig) -> GenerationSpec:
    """Rebuild the spec stored on a config row (workers get ids, not objects)."""
    return GenerationSpec(**config.spec)


def artifact_key(spec: GenerationSpec, source_hash: str, variant_index: int, *, dtype: str | None = None,
                 origin: str = "generated", suffix: str = IMAGE_SUFFIX) -> str:
    """The store key of one image: sha256 over everything that determines its pixels, plus a suffix.

    Covers the source image hash, model id and revision, scheduler, steps, guidance, size, dtype, seed
    and variant index. `per_sample` is left out on purpose: variant 5 is the same image whether 8 or
    63 are asked for, so a config asking for more reuses the files of one asking for fewer.

    Args:
        dtype: The concrete dtype the pixels were made in (`fp16`, `fp32`...). Defaults to the spec's
            field; pass the resolved one, since `auto` means fp16 on GPU and fp32 on CPU.
        origin: `generated`, or `imported` for files made elsewhere (kept apart from ours).
        suffix: The file suffix of the stored encoding.
    """
    payload: dict[str, Any] = {
        "source_hash": source_hash, "model": spec.model, "revision": spec.revision, "scheduler": spec.scheduler,
        "steps": spec.steps, "guidance": spec.guidance, "size": spec.size, "dtype": dtype or spec.dtype,
        "seed": spec.seed, "variant_index": variant_index,
    }
    if origin != "generated":
        payload["origin"] = origin
    return fingerprint_of(payload) + suffix


def missing_variants(session: Session, config_id: int, source_hash: str, per_sample: int) -> list[int]:
    """Variant indices in [0, per_sample) that have no row yet for this config and source image."""
    done = set(session.scalars(
        select(GeneratedImage.variant_index).where(
            GeneratedImage.generation_config_id == config_id,
            GeneratedImage.source_hash == source_hash,
            GeneratedImage.variant_index < per_sample,
        )
    ))
    return [index for index in range(per_sample) if index not in done]


def count_missing(session: Session, *, config_id: int, source_hashes: Iterable[str], per_sample: int) -> int:
    """How many images the given source images still lack (for planning and an ETA)."""
    hashes = list(dict.fromkeys(source_hashes))
    have = 0
    for start in range(0, len(hashes), 500):  # stay far below bound-parameter limits
        have += session.scalar(
            select(func.count()).select_from(GeneratedImage).where(
                GeneratedImage.generation_config_id == config_id,
                GeneratedImage.source_hash.in_(hashes[start:start + 500]),
                GeneratedImage.variant_index < per_sample,
            )
        ) or 0
    return len(hashes) * per_sample - have


def find_generated_paths(
    session: Session, store: ArtifactStore, *, config_id: int, source_hash: str, limit: int | None = None
) -> list[Path]:
    """Files of the generated images of one source image under one config, in variant order; with `limit`,
    variants 0..limit-1 only (those that exist), never a later variant standing in for a missing one."""
    query = (
        select(GeneratedImage.artifact_key)
        .where(GeneratedImage.generation_config_id == config_id, GeneratedImage.source_hash == source_hash)
        .order_by(GeneratedImage.variant_index)
    )
    if limit is not None:
        query = query.where(GeneratedImage.variant_index < limit)
    return [store.path(key) for key in session.scalars(query)]


# One pipeline per process: a worker serves one config at a time, and a second SD copy would only
# take GPU memory. Keyed by what the weights depend on, so configs differing in steps or guidance share it.
_PIPELINE: dict[tuple[str, str | None, str, str, str], StableDiffusionImageVariationPipeline] = {}
_PIPELINE_LOCK = threading.Lock()


def get_pipeline(spec: GenerationSpec, device: str) -> StableDiffusionImageVariationPipeline:
    """The loaded pipeline for `spec` on `device`, loading it (and dropping any other) on first use."""
    key = (spec.model, spec.revision, spec.scheduler, resolve_dtype_name(spec.dtype, device), device)
    with _PIPELINE_LOCK:
        if key not in _PIPELINE:
            _PIPELINE.clear()
            _PIPELINE[key] = load_variation_pipeline(
                spec.model, revision=spec.revision, scheduler=spec.scheduler, dtype=key[3], device=device
            )
        return _PIPELINE[key]


def clear_pipeline_cache() -> None:
    """Forget the loaded pipeline (frees its memory once nothing else holds it)."""
    with _PIPELINE_LOCK:
        _PIPELINE.clear()


class SampleGenerator:
    """Generates the missing variations of source images for one generation spec.

    The pipeline is loaded on first need, once per process: a sample whose images all exist costs
    one query and no model load.
    """

    def __init__(self, spec: GenerationSpec, *, device: str = "auto") -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.dtype = resolve_dtype_name(spec.dtype, self.device)

    @property
    def pipeline(self) -> StableDiffusionImageVariationPipeline:
        return get_pipeline(self.spec, self.device)

    def key(self, source_hash: str, variant_index: int) -> str:
        """Store key of one variant, with the dtype this generator really uses."""
        return artifact_key(self.spec, source_hash, variant_index, dtype=self.dtype)

    def generate_sample(
        self,
        engine: Engine,
        *,
        config_id: int,
        source_path: Path,
        source_hash: str,
        store: ArtifactStore,
        batch_size: int,
        spec: GenerationSpec | None = None,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Make and register the variants of one source image that the config still lacks.

        Args:
            engine: Database engine; one short transaction per batch.
            config_id: Id of the stored config of this generator's spec.
            source_path: The source image file.
            source_hash: sha256 of the source file (the sample's content hash).
            store: Where the image files go.
            batch_size: Variants per pipeline call.
            spec: Optional; must equal the generator's spec when given.
            progress: Called with the number of new images after each committed batch.

        Returns:
            The number of images newly registered (0 when all existed).

        Raises:
            SampleError: the source image cannot be read or decoded.
        """
        if spec is not None and spec != self.spec:
            raise ValueError("`spec` differs from the spec this SampleGenerator was built for")
        # 1. What is missing? Files stored without a row (a killed worker) are adopted, not regenerated.
        with session_scope(engine) as session:
            missing = missing_variants(session, config_id, source_hash, self.spec.per_sample)
        if not missing:
            return 0
        added, missing = self._adopt_stored(engine, config_id, source_hash, missing, store, progress)
        if not missing:
            return added
        # 2. Generate the rest, batch by batch: files first, then the rows, then commit.
        image = load_rgb(source_path, sha256=source_hash)
        seeds = [variant_seed(self.spec.seed, source_hash, index) for index in missing]
        batches = iter_variation_batches(self.pipeline, image, seeds=seeds, spec=self.spec, batch_size=batch_size)
        start = 0
        started = time.perf_counter()
        for images in batches:
            seconds = (time.perf_counter() - started) / len(images)
            indices = missing[start:start + len(images)]
            rows = [_image_row(config_id, source_hash, index, store.put(self.key(source_hash, index), encode_png(img)),
                               img.size, seed=seed, seconds=seconds)
                    for index, seed, img in zip(indices, seeds[start:start + len(images)], images, strict=True)]
            added += _register(engine, rows, progress)
            start += len(images)
            started = time.perf_counter()
        return added

    def _adopt_stored(self, engine: Engine, config_id: int, source_hash: str, missing: list[int],
                      store: ArtifactStore, progress: ProgressCallback | None) -> tuple[int, list[int]]:
        """Register complete files stored without their row; returns (rows added, still missing)."""
        rows, still_missing = [], []
        for index in missing:
            artifact = store.get(self.key(source_hash, index))
            size = _image_size(artifact.path.read_bytes()) if artifact else None
            if artifact is None or size is None:
                still_missing.append(index)
            else:
                rows.append(_image_row(config_id, source_hash, index, artifact, size,
                                       seed=variant_seed(self.spec.seed, source_hash, index)))
        return (_register(engine, rows, progress) if rows else 0), still_missing


def _image_row(config_id: int, source_hash: str, index: int, artifact: Artifact, size: tuple[int, int], *,
               seed: int, seconds: float | None = None, imported: bool = False) -> dict[str, Any]:
    """A generated_images row for a stored file."""
    return {"generation_config_id": config_id, "source_hash": source_hash, "variant_index": index, "seed": seed,
            "artifact_key": artifact.key, "content_hash": artifact.sha256, "width": size[0], "height": size[1],
            "seconds": seconds, "imported": imported}


def _register(engine: Engine, rows: Sequence[dict[str, Any]], progress: ProgressCallback | None) -> int:
    """Insert one source image's rows (existing ones are skipped) in one commit; report the new count."""
    with session_scope(engine) as session:
        # Counted, not taken from insert_ignore: SQLAlchemy 2.1 + psycopg report rowcount -1 for INSERT.
        before = _count_existing(session, rows)
        insert_ignore(session, GeneratedImage, rows)
        added = _count_existing(session, rows) - before
    if progress is not None:
        progress(added)
    return added


def _count_existing(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    (config_id, source_hash), = {(row["generation_config_id"], row["source_hash"]) for row in rows}
    return session.scalar(
        select(func.count()).select_from(GeneratedImage).where(
            GeneratedImage.generation_config_id == config_id,
            GeneratedImage.source_hash == source_hash,
            GeneratedImage.variant_index.in_([row["variant_index"] for row in rows]),
        )
    ) or 0


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an encoded image, or None when it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def import_generated(
    engine: Engine,
    settings: Settings,
    *,
    dataset_version_id: int,
    root: Path,
    spec: GenerationSpec,
    progress: ProgressCallback | None = None,
    follow_outside_links: bool = False,
) -> dict[str, int]:
    """Register variations laid out as the reference writes them: `<root>/<class folder>/<stem>_<i>.jpg`.

    For each sample of the dataset version, files `<stem>_<i>.<jpg|jpeg|png>` with i < `spec.per_sample`
    are looked up in `<root>/<relpath's folder>` and in `<root>/<its last component>` (the reference's
    `<wnid>/`). Their bytes are copied into the artifact store unchanged and registered under the
    config of `spec` with `imported=True`, so a later `submit generate` with the same spec finds them.

    Images that are not `spec.size` pixels square are left out and counted: the spec is what runs that use
    them record as their generator, so images of another size (another generator, or files resized since)
    would be cached under settings that did not make them.

    Returns:
        Counts: generation_config_id, matched_samples (at least one file found), images (newly
        registered), missing_samples (no file found, or no content hash), unreadable_images (cannot be
        read or decoded), other_size_images (decoded, but not spec.size square), outside_links (files whose
        links lead outside `root`: not imported unless `follow_outside_links`).

    Raises:
        NotFoundError: `root` does not exist, or there is no such dataset version.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError("--root", root, "directory does not exist")
    store = ArtifactStore(settings.artifact_root)
    with session_scope(engine) as session:
        if session.get(DatasetVersion, dataset_version_id) is None:
            raise NotFoundError("--dataset", dataset_version_id, "no such dataset version")
        config_id = get_or_create_generation_config(session, spec).id
        samples = session.execute(select(Sample.relpath, Sample.content_hash).where(
            Sample.dataset_version_id == dataset_version_id).order_by(Sample.index)).all()
    counts = dict.fromkeys(("matched_samples", "images", "missing_samples", "unreadable_images",
                            "other_size_images"), 0)
    counts["generation_config_id"] = config_id
    listings = _DirectoryIndex(root, follow_outside_links=follow_outside_links)
    for relpath, source_hash in samples:
        files = listings.variants_of(relpath, spec.per_sample)
        if not files or not source_hash:
            counts["missing_samples"] += 1
            continue
        counts["matched_samples"] += 1
        added, unreadable, other_size = _import_sample(engine, store, spec, config_id, source_hash, files,
                                                       progress)
        counts["images"] += added
        counts["unreadable_images"] += unreadable
        counts["other_size_images"] += other_size
    counts["outside_links"] = listings.outside_links
    return counts


def _import_sample(engine: Engine, store: ArtifactStore, spec: GenerationSpec, config_id: int, source_hash: str,
                   files: dict[int, Path], progress: ProgressCallback | None) -> tuple[int, int, int]:
    """Copy and register one sample's imported files; returns (new rows, unreadable files, other-size files)."""
    with session_scope(engine) as session:
        wanted = set(missing_variants(session, config_id, source_hash, spec.per_sample))
    rows, unreadable, other_size = [], 0, 0
    for index, path in sorted(files.items()):
        if index not in wanted:
            continue
        try:
            data = path.read_bytes()
        except OSError:  # counted like an image that does not decode
            unreadable += 1
            continue
        size = _image_size(data)
        if size is None:
            unreadable += 1
            continue
        if size != (spec.size, spec.size):
            other_size += 1
            continue
        suffix = ".jpg" if path.suffix.lower() in {".jpg", ".jpeg"} else path.suffix.lower()
        artifact = store.put(artifact_key(spec, source_hash, index, origin="imported", suffix=suffix), data)
        rows.append(_image_row(config_id, source_hash, index, artifact, size, seed=IMPORTED_SEED, imported=True))
    return (_register(engine, rows, progress) if rows else 0), unreadable, other_size


class _DirectoryIndex:
    """`<stem>_<i>.<ext>` files of the reference layout, one directory listing per class folder."""

    def __init__(self, root: Path, *, follow_outside_links: bool = False) -> None:
        self.root = root
        self.real_root = root.resolve()
        self.follow_outside_links = follow_outside_links
        self.outside_links = 0  # matching files (or folders) left out because their links lead outside the root
        self._listings: dict[Path, dict[tuple[str, int], Path]] = {}

    def variants_of(self, relpath: str, per_sample: int) -> dict[int, Path]:
        """{variant index: file} for the sample at `relpath` (relative to the dataset root)."""
        rel = Path(relpath)
        # The reference cuts the name at its first dot; a plain stem covers names with extra dots.
        stems = dict.fromkeys([rel.stem, rel.name.split(".")[0]])
        folders = dict.fromkeys([self.root / rel.parent, self.root / rel.parent.name])
        for folder in folders:
            listing = self._listing(folder)
            for stem in stems:
                found = {i: listing[(stem, i)] for i in range(per_sample) if (stem, i) in listing}
                if found:
                    return found
        return {}

    def _listing(self, folder: Path) -> dict[tuple[str, int], Path]:
        if folder not in self._listings:
            entries: dict[tuple[str, int], Path] = {}
            if folder.is_dir() and not self._outside(folder):
                for child in folder.iterdir():
                    match = _REFERENCE_NAME.match(child.name)
                    if match and child.is_file() and not self._outside(child):
                        entries.setdefault((match["stem"], int(match["index"])), child)
            self._listings[folder] = entries
        return self._listings[folder]

    def _outside(self, path: Path) -> bool:
        """A path whose links lead outside the import root, unless allowed (counted)."""
        if self.follow_outside_links or path.resolve().is_relative_to(self.real_root):
            return False
        self.outside_links += 1
        return True


# --- Processors of generate runs (the generated views DiffTPT reads: generated_views.py) -------------------------


# Test hook: seconds to sleep before generating each sample (a slow generator, as on a real GPU box).
GENERATE_DELAY_ENV = "DIFFTPT_OPS_GENERATE_DELAY_S"


class GenerateProcessor:
    """Stable Diffusion variations of one sample; the generation service stores the images itself."""

    def __init__(self, engine: Engine, settings: Settings, *, config_id: int, spec: GenerationSpec, root: Path,
                 batch_size: int, device: str | None, spec_device: str | None = None) -> None:
        self.engine, self.config_id, self.spec, self.root, self.batch_size = engine, config_id, spec, root, batch_size
        self.store = ArtifactStore(settings.artifact_root)
        self.device = execution_device(settings, spec_device, device)
        self.precision = resolve_dtype_name(spec.dtype, self.device)
        self.delay_s = float(os.environ.get(GENERATE_DELAY_ENV) or 0.0)
        key = ("generator", canonical_json(spec.to_dict()), self.device)
        self.generator = MODELS.get(key, lambda: SampleGenerator(spec, device=key[2]))

    def finished_ids(self, connection: Connection, samples: Sequence[Any]) -> set[int]:
        hashes = {sample.content_hash for sample in samples if sample.content_hash}
        counts = dict(connection.execute(
            select(GeneratedImage.source_hash, func.count())
            .where(GeneratedImage.generation_config_id == self.config_id, GeneratedImage.source_hash.in_(hashes))
            .group_by(GeneratedImage.source_hash)).all()) if hashes else {}
        return {s.id for s in samples if s.content_hash and counts.get(s.content_hash, 0) >= self.spec.per_sample}

    def process(self, sample: Any) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)
        if not sample.content_hash:
            raise SampleError(f"sample {sample.index} has no content hash")
        return self.generator.generate_sample(
            self.engine, config_id=self.config_id, spec=self.spec, source_path=self.root / sample.relpath,
            source_hash=sample.content_hash, store=self.store, batch_size=self.batch_size)

    def write(self, connection: Connection, results: list[Any]) -> None:
        """Nothing to write: generate_sample committed the images."""
