"""The per-view feature store on the tiny CLIP: exact reuse for every method, keys that never collide, damaged
or half-written entries, concurrent writers, the `features` run, and --seed reaching the random context."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.data.images import hash_file  # noqa: E402
from difftpt_ops.db.session import session_scope  # noqa: E402
from difftpt_ops.db.tables import GeneratedImage, Prediction, Run, ViewFeatures  # noqa: E402
from difftpt_ops.models.clip import LoadedClip  # noqa: E402
from difftpt_ops.services.reading import reporting  # noqa: E402
from difftpt_ops.services.running import contexts, processors, runs  # noqa: E402
from difftpt_ops.services.running.features import FeatureCache, model_fingerprint_of  # noqa: E402
from difftpt_ops.services.running.status import list_runs, run_status  # noqa: E402
from difftpt_ops.storage.features import FeatureFiles, StoredFeatures, model_fingerprint  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.methods import get_method, method_names  # noqa: E402
from tests.factories import make_generation_config  # noqa: E402
from tests.integration.test_jobs_support import (  # noqa: E402
    add_dataset,
    make_settings,
    open_engine,
    quiet_run_machinery,
    write_pictures,
)
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

SMALL_TPT = {"n_views": "8", "selection_p": "0.25"}
SMALL_DIFFTPT = {"n_conventional": "4", "n_generated": "2", "steps": "1"}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


class _Generated:
    """Stands in for the run's GeneratedViews: `config_id` and the images, with rows for their hashes."""

    def __init__(self, engine: Any, config_id: int, images: list[Image.Image]) -> None:
        self.config_id, self.images = config_id, images

    def images_for(self, sample: Any) -> list[Image.Image]:
        return list(self.images)

    def reencoded_as(self, sample: Any) -> str | None:
        return None  # the images are given as the views read them


def _png_hash(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _setup(workspace: Path, database_url: str, tmp_path: Path, *, n_generated: int = 0,
           generated_seed: int = 100) -> tuple[Any, Any, Any, Any]:
    """Settings, engine, one sample (its image on disk) and its generated views (rows + images)."""
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    random_image(7).save(root / "a.png")
    sample = SimpleNamespace(id=1, index=0, relpath="a.png", content_hash=hash_file(root / "a.png"))
    views = None
    if n_generated:
        images = [random_image(generated_seed + i, (64, 64)) for i in range(n_generated)]
        with session_scope(engine) as session:
            config = make_generation_config(session)
            session.add_all([GeneratedImage(generation_config_id=config.id, source_hash=sample.content_hash,
                                            variant_index=i, seed=i, artifact_key=f"{i}", content_hash=_png_hash(im),
                                            width=64, height=64) for i, im in enumerate(images)])
            config_id = config.id
        views = _Generated(engine, config_id, images)
    return settings, engine, SimpleNamespace(sample=sample, root=root), views


def _cache(engine: Any, settings: Any, clip: LoadedClip) -> FeatureCache:
    return FeatureCache(engine, settings, model_fingerprint=model_fingerprint_of(clip), model_name="tiny")


def _rows(engine: Any) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(ViewFeatures)) or 0)


def _same(a: Any, b: Any, atol: float = 1e-5) -> None:
    assert (a.pred, a.top5, a.zeroshot_pred, a.n_views, a.n_kept) == (b.pred, b.top5, b.zeroshot_pred, b.n_views,
                                                                      b.n_kept)
    assert [v.kept for v in a.views] == [v.kept for v in b.views]
    assert torch.allclose(a.logits, b.logits, atol=atol, rtol=0)


@pytest.mark.parametrize("name", method_names())
def test_warm_store_equals_fresh_for_every_method(name: str, clip: LoadedClip, workspace: Path,
                                                  tmp_path: Path) -> None:
    """Every registered method with its defaults: the store's cold run, its warm run and a run without the
    store give the same predictions and logits; the warm run encodes nothing. A method that needs class
    descriptions (AWT) gets two sentences per class."""
    needs = get_method(name).requires_descriptions
    spec = method_spec_from(name, {"descriptions": "sha256:" + "ef" * 32, "num_descriptor": "2"} if needs else {})
    descriptions = {n.replace("_", " "): [f"A {n} up close.", f"A {n} far away."] for n in CLASS_NAMES} if needs \
        else None
    plan = get_method(name).views(spec)
    settings, engine, data, views = _setup(workspace, f"sqlite:///{workspace / 'difftpt.db'}", tmp_path,
                                           n_generated=plan.n_generated)
    sample, root = data.sample, data.root
    image = Image.open(root / sample.relpath).convert("RGB")
    generated = views.images_for(sample) if views else []
    def tuner():  # type: ignore[no-untyped-def]
        # A fresh tuner per call: online methods carry state across samples, and each of these is the first
        # sample of a stream of one.
        # A method scoring with a reward model (RLCF) gets the same tiny CLIP as its reward model.
        reward = clip if get_method(name).needs_reward_model else None
        made = prepare_classifier(clip, CLASS_NAMES, spec, descriptions=descriptions, reward=reward)
        made.stream_length = 1
        return made

    fresh = tuner().run(image, generated=generated, seed=3, sample_key=sample.content_hash, augmix=False)
    cache = _cache(engine, settings, clip)
    cold = cache.run_sample(tuner(), sample, root=root, views=views, seed=3, augmix=False)
    warm = cache.run_sample(tuner(), sample, root=root, views=views, seed=3, augmix=False)
    assert (cold.views_encoded, cold.views_read) == (fresh.n_views, 0)
    assert (warm.views_encoded, warm.views_read) == (0, fresh.n_views)
    _same(cold, fresh)
    _same(warm, fresh)
    assert _rows(engine) == 1


def test_changed_model_precision_seed_augmix_or_image_never_hits(clip: LoadedClip, workspace: Path, tmp_path: Path,
                                                                  database_url: str) -> None:
    settings, engine, data, views = _setup(workspace, database_url, tmp_path, n_generated=2)
    sample, root = data.sample, data.root
    cache = _cache(engine, settings, clip)
    tpt = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", SMALL_TPT))

    def encoded(tuner: Any, *, seed: int = 0, augmix: bool = False, store: FeatureCache = cache,
                generated: Any = None) -> int:
        return store.run_sample(tuner, sample, root=root, views=generated, seed=seed, augmix=augmix).views_encoded

    assert encoded(tpt) == 8 and encoded(tpt) == 0  # stored, then read
    # Another seed or AugMix: other crops (the original view, the same in every set, is read).
    assert encoded(tpt, seed=1) == 7 and encoded(tpt, seed=1) == 0
    assert encoded(tpt, augmix=True) == 7 and encoded(tpt, augmix=True) == 0
    difftpt = prepare_classifier(clip, CLASS_NAMES, method_spec_from("difftpt", SMALL_DIFFTPT))
    # Its original and 4 crops are views of TPT's stored set: only the 2 generated ones are encoded.
    assert encoded(difftpt, generated=views) == 2 and encoded(difftpt, generated=views) == 0
    # A different generated image (another content hash for variant 1) is a different view.
    with session_scope(engine) as session:
        row = session.scalars(select(GeneratedImage).where(GeneratedImage.variant_index == 1)).one()
        row.content_hash = _png_hash(random_image(999, (64, 64)))
    views.images[1] = random_image(999, (64, 64))
    assert encoded(difftpt, generated=views) == 1
    # Another model: the same architecture with one weight changed.
    other = tiny_clip(tmp_path / "other-clip")
    with torch.no_grad():
        next(other.model.visual.parameters()).add_(1e-3)
    other_cache = _cache(engine, settings, other)
    assert other_cache.model_fingerprint != cache.model_fingerprint
    assert encoded(prepare_classifier(other, CLASS_NAMES, method_spec_from("tpt", SMALL_TPT)), store=other_cache) == 8
    # Precision, device and the weights' dtype are part of the model's fingerprint.
    fp32 = model_fingerprint(clip.model, precision="fp32", device="cpu")
    assert fp32 != model_fingerprint(clip.model, precision="bf16", device="cpu")
    assert fp32 != model_fingerprint(clip.model, precision="fp32", device="cuda")
    assert fp32 == model_fingerprint(clip.model, precision="fp32", device="cpu")
    assert _rows(engine) == 6


def test_views_of_a_stored_set_serve_a_smaller_one(clip: LoadedClip, workspace: Path, tmp_path: Path) -> None:
    """DiffTPT's stored views hold TPT's first views and zero-shot's original: those runs read them."""
    settings, engine, data, views = _setup(workspace, f"sqlite:///{workspace / 'difftpt.db'}", tmp_path,
                                           n_generated=2)
    sample, root = data.sample, data.root
    cache = _cache(engine, settings, clip)
    difftpt = prepare_classifier(clip, CLASS_NAMES, method_spec_from("difftpt", SMALL_DIFFTPT))
    assert cache.run_sample(difftpt, sample, root=root, views=views, seed=0, augmix=False).views_encoded == 7
    for name, overrides in (("tpt", {"n_views": "5"}), ("zeroshot", {})):
        tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from(name, overrides))
        warm = cache.run_sample(tuner, sample, root=root, views=None, seed=0, augmix=False)
        fresh = tuner.run(Image.open(root / sample.relpath), seed=0, sample_key=sample.content_hash)
        assert warm.views_read == fresh.n_views and warm.views_encoded == 0
        _same(warm, fresh)


def test_a_run_encodes_only_the_views_no_stored_set_holds(clip: LoadedClip, workspace: Path, tmp_path: Path,
                                                           database_url: str) -> None:
    """DiffTPT after TPT reads the original and the crops from TPT's set and encodes only its generated views;
    its predictions equal a run that encodes everything, and its whole set is stored for the next run. A damaged
    set counts as missing: its views are encoded again."""
    settings, engine, data, views = _setup(workspace, database_url, tmp_path, n_generated=2)
    sample, root = data.sample, data.root
    cache = _cache(engine, settings, clip)
    tpt = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", SMALL_TPT))
    assert cache.run_sample(tpt, sample, root=root, views=None, seed=0, augmix=False).views_encoded == 8
    difftpt = prepare_classifier(clip, CLASS_NAMES, method_spec_from("difftpt", SMALL_DIFFTPT))
    # Only the missing views are built: the source image (its views all stored) is not even read.
    with patch("difftpt_ops.data.images.load_rgb", side_effect=AssertionError("source image read")):
        mixed = cache.run_sample(difftpt, sample, root=root, views=views, seed=0, augmix=False)
    assert (mixed.views_encoded, mixed.views_read) == (2, 5)
    fresh = prepare_classifier(clip, CLASS_NAMES, method_spec_from("difftpt", SMALL_DIFFTPT)).run(
        Image.open(root / sample.relpath), generated=views.images_for(sample), seed=0,
        sample_key=sample.content_hash)
    # Encoded in batches of 2 and 5 rather than 7 (last-bit differences, ~1e-6), through a tuning step.
    _same(mixed, fresh, atol=1e-4)
    assert _rows(engine) == 2
    again = cache.run_sample(difftpt, sample, root=root, views=views, seed=0, augmix=False)
    assert (again.views_encoded, again.views_read) == (0, 7)
    _same(again, mixed, atol=0)
    # Both sets damaged: nothing is read, every view is encoded, and the set is written again.
    with session_scope(engine) as session:
        keys = list(session.scalars(select(ViewFeatures.artifact_key)))
    for key in keys:
        cache.files.path(key).write_bytes(b"cut")
    other = prepare_classifier(clip, CLASS_NAMES, method_spec_from("difftpt", {**SMALL_DIFFTPT, "steps": "2"}))
    assert cache.run_sample(other, sample, root=root, views=views, seed=0, augmix=False).views_encoded == 7


def test_a_partial_build_refuses_a_source_file_changed_since_registration(clip: LoadedClip, workspace: Path,
                                                                          tmp_path: Path, database_url: str) -> None:
    """TPT after zero-shot reads the original's features and builds only its crops, from the source file: a file
    whose bytes changed since registration is refused there too (the crops would be stored under its old hash)."""
    from difftpt_ops.core.errors import SampleError

    settings, engine, data, _ = _setup(workspace, database_url, tmp_path)
    sample, root = data.sample, data.root
    cache = _cache(engine, settings, clip)
    zeroshot = prepare_classifier(clip, CLASS_NAMES, method_spec_from("zeroshot", {}))
    assert cache.run_sample(zeroshot, sample, root=root, views=None, seed=0, augmix=False).views_encoded == 1
    random_image(8).save(root / sample.relpath)  # other pixels under the registered name
    tpt = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", SMALL_TPT))
    with pytest.raises(SampleError, match="changed since its dataset was registered"):
        cache.run_sample(tpt, sample, root=root, views=None, seed=0, augmix=False)
    assert _rows(engine) == 1  # nothing stored from the changed file


def test_entry_cut_short_is_detected_and_recomputed(clip: LoadedClip, workspace: Path, tmp_path: Path,
                                                   database_url: str) -> None:
    settings, engine, data, _ = _setup(workspace, database_url, tmp_path)
    sample, root = data.sample, data.root
    cache = _cache(engine, settings, clip)
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", SMALL_TPT))
    first = cache.run_sample(tuner, sample, root=root, views=None, seed=0, augmix=False)
    with session_scope(engine) as session:
        key, size = session.execute(select(ViewFeatures.artifact_key, ViewFeatures.size_bytes)).one()
    path = cache.files.path(key)
    data_bytes = path.read_bytes()
    path.write_bytes(data_bytes[:len(data_bytes) // 2])  # what a non-atomic writer killed mid-write would leave
    again = cache.run_sample(tuner, sample, root=root, views=None, seed=0, augmix=False)
    assert (again.views_encoded, again.views_read) == (8, 0)
    _same(again, first)
    assert path.read_bytes() == data_bytes and _rows(engine) == 1
    # Flipped bytes of the same size are caught by the hash.
    path.write_bytes(data_bytes[:-1] + bytes([data_bytes[-1] ^ 0xFF]))
    assert cache.run_sample(tuner, sample, root=root, views=None, seed=0, augmix=False).views_encoded == 8
    assert cache.run_sample(tuner, sample, root=root, views=None, seed=0, augmix=False).views_read == 8
    assert size == len(data_bytes)


_SLOW_WRITER = """
import os, sys, time, torch
from difftpt_ops.storage.features import FeatureFiles
os.fsync = lambda fd: (print("writing", flush=True), time.sleep(60))
FeatureFiles(sys.argv[1]).put(torch.arange(4096, dtype=torch.float32).reshape(64, 64))
"""


def test_kill_9_mid_write_leaves_no_entry(tmp_path: Path) -> None:
    """A writer killed before publishing leaves only its temporary file: no reader ever sees the key."""
    features = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    process = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                               text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "writing"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    files = FeatureFiles(tmp_path)
    from difftpt_ops.storage.features import SUFFIX, encode_features

    key = hashlib.sha256(encode_features(features)).hexdigest() + SUFFIX
    assert not files.path(key).exists()
    assert [p.name.endswith(".tmp") for p in files.path(key).parent.iterdir()] == [True]
    stored = files.put(features)
    assert stored.key == key and stored.created
    assert torch.equal(files.read(StoredFeatures(key, stored.sha256, stored.size_bytes)), features)


def _fill(database_url: str, workspace: str, fingerprint: str, rounds: int) -> int:
    """One worker process: store the same three entries `rounds` times."""
    settings = make_settings(Path(workspace), database_url, device="cpu")
    engine = open_engine(settings)
    cache = FeatureCache(engine, settings, model_fingerprint=fingerprint, model_name="tiny")
    for _ in range(rounds):
        for i in range(3):
            recipes = [{"kind": "original", "resolution": 224 + i}]
            cache.store(f"{i:064x}", recipes, torch.full((1, 16), float(i)))
    return os.getpid()


def test_two_workers_fill_the_same_entries_concurrently(workspace: Path, tmp_path: Path, database_url: str) -> None:
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        pids = list(pool.map(_fill, [database_url] * 2, [str(workspace)] * 2, ["f" * 64] * 2, [10, 10]))
    assert len(set(pids)) == 2
    assert _rows(engine) == 3
    files = FeatureFiles(settings.artifact_root)
    on_disk = sorted(p for p in (settings.artifact_root / "features").rglob("*") if p.is_file())
    assert len(on_disk) == 3 and not [p for p in on_disk if p.name.endswith(".tmp")]
    with session_scope(engine) as session:
        for row in session.scalars(select(ViewFeatures)):
            value = files.read(StoredFeatures(row.artifact_key, row.content_hash, row.size_bytes))
            assert torch.equal(value, torch.full((1, 16), float(row.views[0]["resolution"] - 224)))


def _predictions(engine: Any, run_id: int) -> list[tuple]:
    with session_scope(engine) as session:
        return [tuple(r) for r in session.execute(
            select(Prediction.sample_index, Prediction.pred, Prediction.top5, Prediction.n_views,
                   Prediction.views_encoded, Prediction.views_read)
            .where(Prediction.run_id == run_id).order_by(Prediction.sample_index))]


def test_features_run_fills_the_store_and_tune_runs_read_it(tiny_models_dir: Path, workspace: Path, tmp_path: Path,
                                                           database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_run_machinery(monkeypatch)
    settings = make_settings(workspace, database_url, device="cpu", mlflow_tracking_uri="none")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 3, root=root, classes=2, relpaths=write_pictures(root, 3, seed=20, size=(48, 40)))
    model = str(tiny_models_dir / "clip")
    from difftpt_ops.services.reading.store import store_size
    from difftpt_ops.services.running.features import submit_features

    filled = submit_features(engine, settings, dataset_ref="pics", model=model, pretrained=None, views="tpt")
    assert (filled.kind, filled.state) == ("features", "finished")
    assert store_size(engine)["entries"] == 3 and store_size(engine)["views"] == 3 * 64
    again = submit_features(engine, settings, dataset_ref="pics", model=model, pretrained=None, views="tpt")
    assert (again.run_id, again.created, again.shards_dispatched) == (filled.run_id, False, 0)
    from difftpt_ops.core.errors import InputError
    from difftpt_ops.services.reading.results import load_tune_run_info

    with engine.connect() as connection, pytest.raises(InputError, match="makes stored view features, not predi"):
        load_tune_run_info(connection, filled.run_id)

    tpt = runs.submit_tune(engine, settings, dataset_ref="pics", method="tpt", model=model, pretrained=None)
    zeroshot = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=model, pretrained=None)
    recompute = runs.submit_tune(engine, settings, dataset_ref="pics", method="tpt", model=model, pretrained=None,
                                 overrides={"features": "recompute"})
    assert recompute.run_id != tpt.run_id
    read, fresh = _predictions(engine, tpt.run_id), _predictions(engine, recompute.run_id)
    assert [r[-2:] for r in read] == [(0, 64)] * 3 and [r[-2:] for r in fresh] == [(64, 0)] * 3
    assert [r[:4] for r in read] == [r[:4] for r in fresh]
    assert [r[-2:] for r in _predictions(engine, zeroshot.run_id)] == [(0, 1)] * 3
    assert store_size(engine)["entries"] == 3  # nothing new was stored: every run read
    listed = {r["run_id"]: r for r in list_runs(engine, settings)}
    assert (listed[tpt.run_id]["views_encoded"], listed[tpt.run_id]["views_read"]) == (0, 3 * 64)
    assert (listed[recompute.run_id]["views_encoded"], listed[recompute.run_id]["views_read"]) == (3 * 64, 0)
    # A features run's work is the store (`data show`), not views a method used: no count rather than 0.
    assert (listed[filled.run_id]["views_encoded"], listed[filled.run_id]["views_read"]) == (None, None)
    status = run_status(engine, settings, zeroshot.run_id)[0]
    assert (status["views_encoded"], status["views_read"]) == (0, 3)
    from difftpt_ops.services.datasets import describe_dataset

    assert describe_dataset(engine, "pics")["feature_store"] == store_size(engine)

    with session_scope(engine) as session:
        kinds = set(session.scalars(select(Run.kind)))
    assert kinds == {"features", "tune"}


def test_features_run_records_its_model_as_a_tune_run_does(tiny_models_dir: Path, workspace: Path, tmp_path: Path,
                                                           database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local model folder given relative and with the CLI's default tag: the run's columns (runs list, status,
    run_summary) name the absolute folder and no tag, as the spec does and as a tune run records it."""
    quiet_run_machinery(monkeypatch)
    settings = make_settings(workspace, database_url, device="cpu", mlflow_tracking_uri="none")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 1, root=root, classes=2, relpaths=write_pictures(root, 1, seed=20, size=(48, 40)))
    from difftpt_ops.services.running.features import submit_features

    monkeypatch.chdir(tiny_models_dir)
    filled = submit_features(engine, settings, dataset_ref="pics", model="clip", pretrained="openai", views="tpt")
    with session_scope(engine) as session:
        run = session.get(Run, filled.run_id)
        assert (run.model_name, run.pretrained) == (str((tiny_models_dir / "clip").resolve()), None)
        assert run.spec["model"]["name"] == run.model_name and run.spec["model"]["pretrained"] is None


def test_seed_draws_the_random_context(tiny_models_dir: Path, workspace: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With ctx_init none the run's seed initialises the context: two seeds, two contexts; one seed, one."""
    monkeypatch.setattr(reporting, "report_progress", lambda *_: None)
    monkeypatch.setattr(reporting, "report_finished", lambda *_: None)
    monkeypatch.setattr(reporting, "_next_report", {})
    contexts.clear_caches()
    settings = make_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", device="cpu",
                             mlflow_tracking_uri="none")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 1, root=root, classes=2, relpaths=write_pictures(root, 1, seed=20, size=(48, 40)))
    model = str(tiny_models_dir / "clip")
    overrides = {"prompt.ctx_init": "none", "n_views": "4"}
    for seed in (0, 1):
        runs.submit_tune(engine, settings, dataset_ref="pics", method="tpt", model=model, pretrained=None,
                         overrides=overrides, seed=seed)
    inits = [value.learner.ctx_init for key, value in processors.MODELS._items.items() if key[0] == "tuner"]
    assert len(inits) == 2 and not torch.equal(inits[0], inits[1])
    width = inits[0].shape[1]
    expected = torch.randn(4, width, generator=torch.Generator().manual_seed(1)) * 0.02
    assert torch.equal(inits[1].cpu(), expected)


def test_store_counts_are_the_rows(clip: LoadedClip, workspace: Path, tmp_path: Path) -> None:
    settings, engine, data, _ = _setup(workspace, f"sqlite:///{workspace / 'difftpt.db'}", tmp_path)
    from difftpt_ops.services.reading.store import store_size

    assert store_size(engine) == {"entries": 0, "bytes": 0, "views": 0}
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", SMALL_TPT))
    _cache(engine, settings, clip).run_sample(tuner, data.sample, root=data.root, views=None, seed=0, augmix=False)
    size = store_size(engine)
    stored = sorted((settings.artifact_root / "features").rglob("*.st"))
    assert size["entries"] == 1 and size["views"] == 8 and size["bytes"] == stored[0].stat().st_size


def test_runs_list_tells_a_recompute_run_from_one_that_read_the_store(tiny_models_dir: Path, workspace: Path,
                                                                     tmp_path: Path, database_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: `runs list` (table and --json) showed a run with `--set features=recompute` exactly as the same run
    that read the store (same settings, seed and model). `features` is in --json and `status --json` ("store",
    "recompute"; null for runs that are not tuning runs) and the table's settings say `features=recompute`."""
    import json

    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setattr(reporting, "report_progress", lambda *_: None)
    monkeypatch.setattr(reporting, "report_finished", lambda *_: None)
    contexts.clear_caches()
    settings = make_settings(workspace, database_url, device="cpu", mlflow_tracking_uri="none")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 2, root=root, classes=2, relpaths=write_pictures(root, 2, seed=20, size=(48, 40)))
    model = str(tiny_models_dir / "clip")
    stored = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=model, pretrained=None)
    fresh = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=model, pretrained=None,
                             overrides={"features": "recompute"})
    for key, value in {"DIFFTPT_OPS_WORKSPACE": str(workspace), "DIFFTPT_OPS_DATABASE_URL": database_url,
                       "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none"}.items():
        monkeypatch.setenv(key, value)
    listed = CliRunner().invoke(app, ["runs", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    by_id = {r["run_id"]: r for r in json.loads(listed.output)}
    assert (by_id[stored.run_id]["features"], by_id[fresh.run_id]["features"]) == ("store", "recompute")
    assert by_id[stored.run_id]["settings"] == by_id[fresh.run_id]["settings"] == ""  # the same table row
    status = CliRunner().invoke(app, ["status", str(fresh.run_id), "--json"])
    assert json.loads(status.output)[0]["features"] == "recompute", status.output
    table = CliRunner().invoke(app, ["runs", "list", "--format", "tsv"])
    rows = [line.split("\t") for line in table.output.splitlines()]
    column = rows[0].index("settings")
    settings_of = {int(row[0]): row[column] for row in rows[1:]}
    assert (settings_of[stored.run_id], settings_of[fresh.run_id]) == ("", "features=recompute"), table.output


def test_a_stored_sets_seconds_are_its_building_and_encoding_not_the_look_up(clip: LoadedClip, workspace: Path,
                                                                              tmp_path: Path) -> None:
    """ViewFeatures.seconds is the time spent making the set (views built, encoded), as before the gather/finish
    split: neither the look-up of stored sets nor the reading of those that hold some of its views."""
    import time

    settings, engine, data, _ = _setup(workspace, f"sqlite:///{workspace / 'difftpt.db'}", tmp_path)
    cache = _cache(engine, settings, clip)
    looked_up = FeatureCache._stored_sets

    def slow_look_up(self: FeatureCache, sample_hash: str) -> Any:
        time.sleep(1.0)
        return looked_up(self, sample_hash)

    tpt = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", SMALL_TPT))
    with patch.object(FeatureCache, "_stored_sets", slow_look_up):
        assert cache.run_sample(tpt, data.sample, root=data.root, views=None, seed=0, augmix=False).views_encoded == 8
    with session_scope(engine) as session:
        seconds = session.scalar(select(ViewFeatures.seconds))
    assert seconds is not None and 0 < seconds < 1.0
