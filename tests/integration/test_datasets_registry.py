"""The dataset registry on SQLite and PostgreSQL: register, idempotence, conflicts, subsets, failed samples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from difftpt_ops.core.errors import ConflictError, InputError, NotFoundError
from difftpt_ops.db.session import get_engine, session_scope, upgrade
from difftpt_ops.db.tables import Dataset, DatasetVersion, Sample
from difftpt_ops.services import datasets as service
from difftpt_ops.services.datasets import (
    create_subset,
    describe_dataset,
    list_datasets,
    register_dataset,
    resolve_dataset_version,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(database_url: str) -> Engine:
    engine = get_engine(database_url)
    upgrade(engine)
    return engine


def make_tree(root: Path, counts: dict[str, int], corrupt: str | None = None) -> Path:
    """An ImageFolder with `counts[class]` distinct PNGs per class and optionally one corrupt file."""
    for c, (name, n) in enumerate(sorted(counts.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (6, 5), (c * 40, i, 7)).save(root / name / f"{i:03d}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"this is not a picture")
    return root


def row_counts(engine: Engine) -> tuple[int, int, int]:
    with session_scope(engine) as session:
        return tuple(session.scalar(select(func.count()).select_from(t)) or 0  # type: ignore[return-value]
                     for t in (Dataset, DatasetVersion, Sample))


def test_register_stores_samples_and_failed_reasons(engine: Engine, tmp_path: Path) -> None:
    """Every file becomes a row with its hash; the corrupt one is failed with a reason and keeps its label."""
    root = make_tree(tmp_path / "ds", {"cat": 3, "dog": 2}, corrupt="dog/zz.jpg")
    report = register_dataset(engine, name="pets-mini", root=root)
    assert report["status"] == "registered" and report["format"] == "imagefolder"
    assert (report["num_samples"], report["num_ok"], report["num_failed"]) == (6, 5, 1)
    assert report["failures"][0]["relpath"] == "dog/zz.jpg"
    with session_scope(engine) as session:
        samples = session.scalars(select(Sample).order_by(Sample.index)).all()
        assert [s.index for s in samples] == list(range(6))
        assert [s.label for s in samples] == [0, 0, 0, 1, 1, 1]
        failed = [s for s in samples if s.status == "failed"]
        assert len(failed) == 1 and failed[0].label == 1 and "cannot decode image" in (failed[0].error or "")
        assert all(s.content_hash and len(s.content_hash) == 64 for s in samples)
        _, version = resolve_dataset_version(session, "pets-mini")
        assert (version.version, version.num_samples, version.num_failed) == (1, 6, 1)
        assert version.fingerprint == report["fingerprint"]


def test_same_content_is_idempotent_other_content_conflicts(engine: Engine, tmp_path: Path) -> None:
    """Registering again changes nothing; a changed file under the same name is a conflict naming NAME."""
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 2})
    first = register_dataset(engine, name="toy", root=root)
    copy = make_tree(tmp_path / "copy", {"a": 2, "b": 2})
    again = register_dataset(engine, name="toy", root=copy, format="imagefolder")
    assert again["status"] == "already registered" and again["fingerprint"] == first["fingerprint"]
    assert row_counts(engine) == (1, 1, 4)
    Image.new("RGB", (6, 5), (1, 1, 1)).save(copy / "a" / "000.png")
    with pytest.raises(ConflictError) as info:
        register_dataset(engine, name="toy", root=copy)
    assert info.value.argument == "NAME" and info.value.value == "toy" and info.value.exit_code == 2
    names = tmp_path / "names.txt"
    names.write_text("alpha\nbeta\n")
    with pytest.raises(ConflictError, match="other class names"):
        register_dataset(engine, name="toy", root=root, class_names_file=names)
    assert row_counts(engine) == (1, 1, 4)


def test_bad_input_writes_nothing(engine: Engine, tmp_path: Path) -> None:
    """Missing root, unknown format, wrong class-name count, subset too big: errors, and no rows."""
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 1}, corrupt="b/bad.png")
    names = tmp_path / "names.txt"
    names.write_text("one\n")
    attempts = [
        (NotFoundError, "--root", {"root": tmp_path / "missing"}),
        (InputError, "--format", {"root": root, "format": "nope"}),
        (InputError, "--class-names", {"root": root, "class_names_file": names}),
        (InputError, "--subset", {"root": root, "subset": 4}),  # 3 readable samples only
    ]
    for error, argument, kwargs in attempts:
        with pytest.raises(error) as info:
            register_dataset(engine, name="x", **kwargs)
        assert info.value.argument == argument
    assert row_counts(engine) == (0, 0, 0)


def test_failure_midway_leaves_nothing(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while inserting samples rolls the dataset and version rows back too."""
    root = make_tree(tmp_path / "ds", {"a": 2})

    def explode(*_args: object, **_kwargs: object) -> int:
        raise RuntimeError("disk full")

    monkeypatch.setattr(service, "insert_ignore", explode)
    with pytest.raises(RuntimeError):
        register_dataset(engine, name="x", root=root)
    assert row_counts(engine) == (0, 0, 0)


def test_subset_is_a_stratified_reproducible_version(engine: Engine, tmp_path: Path) -> None:
    """A subset is version 2 (parent 1), ok samples only, proportional per class, reused when asked again."""
    root = make_tree(tmp_path / "ds", {"a": 10, "b": 6, "c": 4}, corrupt="a/zz.png")
    report = register_dataset(engine, name="toy", root=root, subset=10, seed=7)
    subset = report["subset"]
    assert (subset["status"], subset["version"], subset["num_samples"]) == ("created", 2, 10)
    with session_scope(engine) as session:
        dataset, version = resolve_dataset_version(session, "toy")  # latest = the subset
        assert version.version == 2 and version.parent_version_id == report["dataset_version_id"]
        rows = session.scalars(select(Sample).where(Sample.dataset_version_id == version.id)
                               .order_by(Sample.index)).all()
        assert [r.index for r in rows] == list(range(10)) and all(r.status == "ok" for r in rows)
        assert Counter(r.label for r in rows) == {0: 5, 1: 3, 2: 2}
        chosen = [r.relpath for r in rows]
    again = create_subset(engine, name="toy", size=10, seed=7)
    assert again["status"] == "reused" and again["fingerprint"] == subset["fingerprint"]
    other = create_subset(engine, name="toy", size=10, seed=8)
    assert other["version"] == 3 and other["fingerprint"] != subset["fingerprint"]
    # The same files registered under another name give the same subset.
    twin = register_dataset(engine, name="twin", root=root, subset=10, seed=7)["subset"]
    with session_scope(engine) as session:
        _, version = resolve_dataset_version(session, "twin@2")
        assert [r.relpath for r in session.scalars(select(Sample).where(
            Sample.dataset_version_id == version.id).order_by(Sample.index))] == chosen
    assert twin["fingerprint"] == subset["fingerprint"]
    with pytest.raises(InputError, match="--subset=21"):
        create_subset(engine, name="toy", size=21, seed=0)  # 20 readable


def test_resolve_list_and_describe(engine: Engine, tmp_path: Path) -> None:
    """NAME and NAME@V resolve; unknown names say where to look; describe lists classes and failures."""
    root = make_tree(tmp_path / "ds", {"a": 2, "b": 2}, corrupt="b/bad.jpg")
    register_dataset(engine, name="toy", root=root, subset=2, seed=0)
    with session_scope(engine) as session:
        assert resolve_dataset_version(session, "toy@1")[1].version == 1
        with pytest.raises(NotFoundError, match="no such dataset; see `difftpt-ops data list`") as info:
            resolve_dataset_version(session, "nope")
        assert info.value.argument == "--dataset" and info.value.value == "nope"
        with pytest.raises(NotFoundError, match="--dataset=toy@9"):
            resolve_dataset_version(session, "toy@9")
    listed = list_datasets(engine)
    assert [(d["name"], d["num_samples"], d["num_failed"], d["versions"]) for d in listed] == [("toy", 5, 1, [1, 2])]
    info_full = describe_dataset(engine, "toy@1")
    assert info_full["class_names"] == ["a", "b"] and info_full["num_classes"] == 2
    assert info_full["per_class"] == [{"label": 0, "name": "a", "ok": 2, "failed": 0},
                                      {"label": 1, "name": "b", "ok": 2, "failed": 1}]
    assert [f["relpath"] for f in info_full["failed_samples"]] == ["b/bad.jpg"]
    assert [v["version"] for v in info_full["versions"]] == [1, 2]
    latest = describe_dataset(engine, "toy")
    assert latest["version"]["version"] == 2 and latest["version"]["parent_version"] == 1
    assert latest["failed_samples"] == []
