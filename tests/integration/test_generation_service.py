"""Generation as a cache on SQLite and PostgreSQL: rows, files, resume, bad sources, import."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine

from difftpt_ops.config import load_settings
from difftpt_ops.core.errors import NotFoundError, SampleError
from difftpt_ops.core.specs import GenerationSpec
from difftpt_ops.data.images import hash_file
from difftpt_ops.db.session import get_engine, session_scope, upgrade
from difftpt_ops.db.tables import Dataset, DatasetVersion, GeneratedImage, GenerationConfig, Sample
from difftpt_ops.models.tiny_diffusion import TINY_SIZE, make_tiny_variation_pipeline
from difftpt_ops.services.running import generation
from difftpt_ops.storage.artifacts import TEMP_SUFFIX, ArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

torch = pytest.importorskip("torch")
PER_SAMPLE = 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_variation_pipeline(tmp_path_factory.mktemp("tiny-gen") / "sd-image-variations")


@pytest.fixture
def spec(tiny_dir: Path) -> GenerationSpec:
    return GenerationSpec(model=str(tiny_dir), revision=None, steps=2, size=TINY_SIZE, per_sample=PER_SAMPLE)


@pytest.fixture
def engine(database_url: str) -> Engine:
    engine = get_engine(database_url)
    upgrade(engine)
    return engine


@dataclasses.dataclass
class Source:
    relpath: str
    path: Path
    content_hash: str


def _make_dataset(engine: Engine, root: Path, count: int, *, corrupt: tuple[int, ...] = ()) -> tuple[int, list[Source]]:
    """Write `count` images under root/<wnid>/ and register them as version 1 of a dataset."""
    rng = np.random.default_rng(7)
    sources = []
    for index in range(count):
        relpath = f"n0{index % 2}/img_{index:03d}.jpg"
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if index in corrupt:
            path.write_bytes(b"not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path, format="JPEG")
        sources.append(Source(relpath, path, hash_file(path)))
    with session_scope(engine) as session:
        dataset = Dataset(name="toy", format="imagefolder", root=str(root), class_names=["a", "b"])
        session.add(dataset)
        session.flush()
        version = DatasetVersion(dataset_id=dataset.id, version=1, fingerprint="f" * 64, num_samples=count)
        session.add(version)
        session.flush()
        session.add_all(Sample(dataset_version_id=version.id, index=i, relpath=s.relpath, label=i % 2,
                               content_hash=s.content_hash) for i, s in enumerate(sources))
        return version.id, sources


def _config_id(engine: Engine, spec: GenerationSpec) -> int:
    with session_scope(engine) as session:
        return generation.get_or_create_generation_config(session, spec).id


def _rows(engine: Engine, config_id: int) -> list[GeneratedImage]:
    with session_scope(engine) as session:
        query = select(GeneratedImage).where(GeneratedImage.generation_config_id == config_id)
        return list(session.scalars(query.order_by(GeneratedImage.source_hash, GeneratedImage.variant_index)))


def _generate_all(engine: Engine, spec: GenerationSpec, config_id: int, sources: list[Source], store: ArtifactStore,
                  *, batch_size: int = 2) -> tuple[int, list[str]]:
    """What the run machinery does: every sample, failures recorded, the rest goes on."""
    generator, new, failures = generation.SampleGenerator(spec, device="cpu"), 0, []
    for source in sources:
        try:
            new += generator.generate_sample(engine, config_id=config_id, source_path=source.path,
                                             source_hash=source.content_hash, store=store, batch_size=batch_size)
        except SampleError as exc:
            failures.append(str(exc))
    return new, failures


def _assert_complete(engine: Engine, config_id: int, store: ArtifactStore, sources: list[Source]) -> None:
    rows = _rows(engine, config_id)
    assert len(rows) == len(sources) * PER_SAMPLE
    assert {(r.source_hash, r.variant_index) for r in rows} == {
        (s.content_hash, i) for s in sources for i in range(PER_SAMPLE)}
    for row in rows:
        path = store.path(row.artifact_key)
        assert hash_file(path) == row.content_hash
        assert Image.open(path).size == (row.width, row.height) == (TINY_SIZE, TINY_SIZE)
    assert not list(store.root.rglob(f"*{TEMP_SUFFIX}"))


def test_samples_times_variants_then_nothing_twice(engine: Engine, spec: GenerationSpec, tmp_path: Path) -> None:
    """N samples x k variants give N*k rows whose files hash as recorded; a second pass generates nothing."""
    _, sources = _make_dataset(engine, tmp_path / "data", 2)
    config_id, store = _config_id(engine, spec), ArtifactStore(tmp_path / "artifacts")
    assert _config_id(engine, spec) == config_id  # one config row per spec
    assert _config_id(engine, dataclasses.replace(spec, steps=3)) != config_id
    with session_scope(engine) as session:
        assert generation.spec_of(session.get(GenerationConfig, config_id)) == spec
    assert _generate_all(engine, spec, config_id, sources, store) == (2 * PER_SAMPLE, [])
    _assert_complete(engine, config_id, store, sources)
    assert _generate_all(engine, spec, config_id, sources, store) == (0, [])
    assert len(_rows(engine, config_id)) == 2 * PER_SAMPLE
    with session_scope(engine) as session:
        paths = generation.find_generated_paths(session, store, config_id=config_id,
                                                source_hash=sources[0].content_hash, limit=2)
        assert paths == [store.path(generation.SampleGenerator(spec, device="cpu").key(sources[0].content_hash, i))
                         for i in range(2)]
        assert generation.count_missing(session, config_id=config_id, per_sample=PER_SAMPLE + 1,
                                        source_hashes=[s.content_hash for s in sources]) == 2


class Killed(Exception):
    """Stands in for a worker killed between two batches."""


def test_killed_run_resumes_without_duplicates_or_truncated_files(
    engine: Engine, spec: GenerationSpec, tmp_path: Path
) -> None:
    """A crash after one batch, a stray temp file and a file without its row: resume completes cleanly."""
    _, sources = _make_dataset(engine, tmp_path / "data", 1)
    source, config_id = sources[0], _config_id(engine, spec)
    store = ArtifactStore(tmp_path / "artifacts")
    generator = generation.SampleGenerator(spec, device="cpu")

    def kill(_new: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        generator.generate_sample(engine, config_id=config_id, source_path=source.path,
                                  source_hash=source.content_hash, store=store, batch_size=2, progress=kill)
    assert len(_rows(engine, config_id)) == 2  # the first batch was committed before the kill
    # Killed between rename and insert: a complete file without its row.
    orphan_key = generator.key(source.content_hash, 1)
    with session_scope(engine) as session:
        session.execute(delete(GeneratedImage).where(GeneratedImage.variant_index == 1))
    orphan_mtime = store.path(orphan_key).stat().st_mtime_ns
    # Killed mid-write: a truncated temp file next to where variant 2 will go.
    pending = store.path(generator.key(source.content_hash, 2))
    pending.parent.mkdir(parents=True, exist_ok=True)
    (pending.parent / f".{pending.name}.4242.0badf00d{TEMP_SUFFIX}").write_bytes(b"\x89PNG trunc")

    counted: list[int] = []
    new = generator.generate_sample(engine, config_id=config_id, source_path=source.path,
                                    source_hash=source.content_hash, store=store, batch_size=2, progress=counted.append)
    assert new == sum(counted) == 2
    assert store.path(orphan_key).stat().st_mtime_ns == orphan_mtime  # adopted, not generated again
    (pending.parent / f".{pending.name}.4242.0badf00d{TEMP_SUFFIX}").unlink()
    _assert_complete(engine, config_id, store, sources)
    with session_scope(engine) as session:
        per_key = session.execute(
            select(func.count()).select_from(GeneratedImage).group_by(GeneratedImage.source_hash,
                                                                      GeneratedImage.variant_index)
        ).scalars().all()
    assert per_key == [1] * PER_SAMPLE


def test_regenerating_from_scratch_reproduces_the_images(engine: Engine, spec: GenerationSpec, tmp_path: Path) -> None:
    """Same seeds: byte-identical files for the same batch size; pixels within 1/255 for another."""
    _, sources = _make_dataset(engine, tmp_path / "data", 1)
    config_id = _config_id(engine, spec)
    first = ArtifactStore(tmp_path / "first")
    _generate_all(engine, spec, config_id, sources, first, batch_size=3)
    hashes = [row.content_hash for row in _rows(engine, config_id)]
    for name, batch_size in (("same", 3), ("other", 1)):
        with session_scope(engine) as session:
            session.execute(delete(GeneratedImage))
        store = ArtifactStore(tmp_path / name)
        _generate_all(engine, spec, config_id, sources, store, batch_size=batch_size)
        rows = _rows(engine, config_id)
        if batch_size == 3:
            assert [row.content_hash for row in rows] == hashes
        for row in rows:
            a = np.asarray(Image.open(first.path(row.artifact_key)), dtype=np.int16)
            b = np.asarray(Image.open(store.path(row.artifact_key)), dtype=np.int16)
            assert np.abs(a - b).max() <= 1


def test_unreadable_source_fails_alone(engine: Engine, spec: GenerationSpec, tmp_path: Path) -> None:
    """A corrupt image raises SampleError naming the file; the other samples are generated."""
    _, sources = _make_dataset(engine, tmp_path / "data", 2, corrupt=(0,))
    config_id, store = _config_id(engine, spec), ArtifactStore(tmp_path / "artifacts")
    new, failures = _generate_all(engine, spec, config_id, sources, store)
    assert new == PER_SAMPLE
    assert len(failures) == 1 and sources[0].relpath.split("/")[-1] in failures[0]
    _assert_complete(engine, config_id, store, sources[1:])


def test_source_changed_since_registration_fails_alone(engine: Engine, spec: GenerationSpec, tmp_path: Path) -> None:
    """Variants are keyed by the source's registered hash: a source file rewritten since is refused, saying so,
    and nothing is generated from it; the other sample is generated."""
    _, sources = _make_dataset(engine, tmp_path / "data", 2)
    Image.new("RGB", (56, 40), (1, 2, 3)).save(sources[0].path, format="JPEG")
    config_id, store = _config_id(engine, spec), ArtifactStore(tmp_path / "artifacts")
    new, failures = _generate_all(engine, spec, config_id, sources, store)
    assert new == PER_SAMPLE
    assert len(failures) == 1 and "changed since its dataset was registered" in failures[0]
    _assert_complete(engine, config_id, store, sources[1:])


def _write_reference_layout(root: Path, source: Source, count: int, size: int = TINY_SIZE) -> None:
    """`<root>/<wnid>/<stem>_<i>.jpg`, as DiffTPT's generator writes it."""
    folder = root / Path(source.relpath).parent.name
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(source.relpath).stem
    for index in range(count):
        Image.new("RGB", (size, size), (index * 40, 10, 10)).save(folder / f"{stem}_{index}.jpg", format="JPEG")


def test_import_generated_registers_reference_layout(
    engine: Engine, database_url: str, spec: GenerationSpec, tmp_path: Path
) -> None:
    """Matched samples, imported images and missing samples are counted; generation then reuses them."""
    version_id, sources = _make_dataset(engine, tmp_path / "data", 3)
    root = tmp_path / "reference"
    _write_reference_layout(root, sources[0], PER_SAMPLE + 2)  # extra indices beyond per_sample are ignored
    _write_reference_layout(root, sources[1], PER_SAMPLE)
    (root / "n01" / "img_001_2.jpg").write_bytes(b"broken")
    # An image of another size than the spec's was not made by that generator: left out, counted.
    Image.new("RGB", (TINY_SIZE // 2, TINY_SIZE), "red").save(root / "n01" / "img_001_1.jpg", format="JPEG")
    settings = load_settings(tmp_path / "ws", env={"DIFFTPT_OPS_DATABASE_URL": database_url})
    counts = generation.import_generated(engine, settings, dataset_version_id=version_id, root=root, spec=spec)
    assert counts["matched_samples"] == 2 and counts["missing_samples"] == 1
    assert counts["images"] == 2 * PER_SAMPLE - 2 and counts["unreadable_images"] == 1
    assert counts["other_size_images"] == 1
    rows = _rows(engine, counts["generation_config_id"])
    assert all(row.imported for row in rows)
    store = ArtifactStore(settings.artifact_root)
    assert all(hash_file(store.path(row.artifact_key)) == row.content_hash for row in rows)
    again = generation.import_generated(engine, settings, dataset_version_id=version_id, root=root, spec=spec)
    assert again["images"] == 0
    # A run on these images says they were imported, with the settings given for them.
    from difftpt_ops.services.running.status import show_run
    from tests.factories import make_run

    with session_scope(engine) as session:
        run_id = make_run(session, session.get(DatasetVersion, version_id), method="difftpt",
                          generation_config_id=counts["generation_config_id"]).id
    generator = show_run(engine, run_id)["generator"]
    assert (generator["images_made"], generator["images_imported"]) == (0, 2 * PER_SAMPLE - 2)
    assert generator["settings"] == spec.to_dict() and generator["config_id"] == counts["generation_config_id"]
    # The fully imported sample needs no generation (and no model load).
    assert generation.SampleGenerator(spec, device="cpu").generate_sample(
        engine, config_id=counts["generation_config_id"], source_path=sources[0].path,
        source_hash=sources[0].content_hash, store=store, batch_size=2) == 0


def test_import_generated_missing_root(spec: GenerationSpec, tmp_path: Path) -> None:
    """A root that does not exist is NotFoundError naming --root, before the database is touched."""
    settings = load_settings(tmp_path / "ws", env={})
    engine = get_engine(f"sqlite:///{tmp_path / 'unused.db'}")
    with pytest.raises(NotFoundError) as info:
        generation.import_generated(engine, settings, dataset_version_id=1, root=tmp_path / "nope", spec=spec)
    assert info.value.argument == "--root"
