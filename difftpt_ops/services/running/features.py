"""The per-view feature store as a service: read a sample's view features instead of encoding them.

For a (model, sample, view recipes) the image encoder runs once: the first run that needs the views encodes
them and stores the result (storage/features.py: file first, then its `view_features` row); every later run
of any method, seed or sweep that needs those views, or a subset of a stored set's views, reads them; a run
that needs views no stored set holds encodes only those and stores its whole set. A read checks size and
hash; a damaged or missing file is discarded, recomputed and its row repaired. Off for a run with
`--set features=recompute`.

`submit features` fills the store for a dataset ahead of the tuning runs, as a run of kind "features" on the
`tune` queue (GPU workers): one encoder pass then serves every method.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection, Engine

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import utcnow
from difftpt_ops.core.errors import InputError, SampleError, about_one_sample
from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.core.run_specs import FEATURE_VIEWS, FeaturesRunSpec
from difftpt_ops.core.specs import fingerprint_of
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import GeneratedImage, Run, ViewFeatures
from difftpt_ops.db.writes import insert_many_ignore
from difftpt_ops.services.running.generated_views import generated_views_for
from difftpt_ops.services.running.processors import MODELS, Prepared, execution_device
from difftpt_ops.services.running.submit_checks import (
    check_execution_args,
    check_model_path,
    resolve_run_device,
    run_model_spec,
)
from difftpt_ops.services.running.views_ahead import builds_views_ahead

FEATURES_KIND = "features"


@dataclasses.dataclass
class GatheredViews:
    """A sample's views before the model (`FeatureCache.gather`): every view's stored features (`raw`), or those
    some stored sets hold (`stored`, by position) and the pixels of the `missing` ones, or every view built
    (`built`, a ViewBatch: nothing stored, or a sample the store cannot key, whose `recipes` are None)."""

    sample_hash: str | None
    recipes: list[dict[str, Any]] | None
    raw: Any | None = None
    stored: dict[int, Any] = dataclasses.field(default_factory=dict)
    missing: list[int] = dataclasses.field(default_factory=list)
    pixels: Any | None = None
    built: Any | None = None
    build_seconds: float = 0.0  # reading and building, part of the stored set's `seconds`


class FeatureCache:
    """The feature store for one loaded model: look up, read, or encode and store a sample's views."""

    def __init__(self, engine: Engine, settings: Settings, *, model_fingerprint: str, model_name: str) -> None:
        from difftpt_ops.storage.features import FeatureFiles

        self.engine, self.model_fingerprint, self.model_name = engine, model_fingerprint, model_name
        self.files = FeatureFiles(settings.artifact_root)
        # The store of a method's reward model (RLCF), under its own fingerprint: see `feature_cache_for`.
        self.reward_cache: FeatureCache | None = None

    def run_sample(self, tuner: Any, sample: Any, *, root: Path, views: Any, seed: int, augmix: bool,
                   gathered: GatheredViews | None = None) -> Any:
        """The tuner's result for `sample`, its views' features read from the store where stored.

        The result's views_encoded / views_read say which happened (for the run's CLIP). `views` is the run's
        GeneratedViews (None when the method reads no generated images). `gathered` is `gather(...)` of this
        sample with the same arguments, done beforehand (in another thread); without it, it is done now.
        """
        if gathered is None:
            gathered = self.gather(tuner, sample, root=root, views=views, seed=seed, augmix=augmix)
        raw, kinds, encoded = self.finish(tuner, gathered)
        reward = self._reward_source(tuner, sample, root=root, views=views, seed=seed, augmix=augmix) \
            if getattr(tuner, "needs_pixels", False) else None
        result = tuner.run_features(raw, kinds, reward_features=reward)
        return dataclasses.replace(result, views_encoded=encoded, views_read=len(kinds) - encoded)

    def _reward_source(self, tuner: Any, sample: Any, *, root: Path, views: Any, seed: int,
                       augmix: bool) -> Callable[[list[int]], Any]:
        """The reward model's output for the kept views at the positions the method asks for (RLCF): read from
        the reward model's own stored sets where held, the others built (those views only) and encoded, and
        stored as a set of their own. Once a sample's views are stored for both models, none is built."""
        def encoded(positions: list[int]) -> Any:
            return tuner.reward.encode_raw(self._build_some(tuner, sample, root=root, views=views, seed=seed,
                                                            augmix=augmix, positions=positions))

        def features(positions: list[int]) -> Any:
            recipes = self._recipes(tuner, sample, views=views, seed=seed, augmix=augmix)
            if recipes is None or self.reward_cache is None:  # not keyable: encoded, not stored
                return encoded(positions)
            return self.reward_cache.read_or_encode(sample.content_hash, [recipes[i] for i in positions],
                                                    lambda missing: encoded([positions[j] for j in missing]))
        return features

    def read_or_encode(self, sample_hash: str, recipes: Sequence[dict[str, Any]],
                       encode: Callable[[list[int]], Any]) -> Any:
        """The stored features of the views `recipes` describe; those no stored set holds are encoded now
        (`encode(positions)` gives their features, in order) and the whole set is stored."""
        sets = self._stored_sets(sample_hash)
        raw = self._read_whole(sets, recipes)
        if raw is not None:
            return raw
        stored = self._read_some(sets, recipes)
        started = time.perf_counter()
        missing = [i for i in range(len(recipes)) if i not in stored]
        fresh = encode(missing) if missing else None  # several sets may hold all of them between them
        raw = self._fill(stored, fresh, missing) if stored else fresh
        self.store(sample_hash, recipes, raw, seconds=time.perf_counter() - started)
        return raw

    def _recipes(self, tuner: Any, sample: Any, *, views: Any, seed: int, augmix: bool) -> list[dict[str, Any]] | None:
        """The recipes of the sample's views as the tuner builds them, or None when the store cannot key this
        sample (`_generated_hashes`)."""
        from difftpt_ops.storage.features import view_recipes

        plan = tuner.plan
        hashes = self._generated_hashes(views, sample, plan.n_generated)
        if hashes is None:
            return None
        return view_recipes(n_conventional=plan.n_conventional, generated_hashes=hashes, seed=seed,
                            augmix=tuner.augmix_for(augmix), resolution=plan.resolution, crop_scale=plan.crop_scale,
                            generated_reencode=_reencoded_as(views, sample, hashes))

    def gather(self, tuner: Any, sample: Any, *, root: Path, views: Any, seed: int, augmix: bool) -> GatheredViews:
        """What the views `tuner` needs take before the model: one stored set holding them all is read; otherwise
        the views some stored sets hold are read from them and only the others are built on the CPU (DiffTPT
        after TPT builds its generated views, not TPT's crops), their images read. `finish` encodes and stores.
        Safe in another thread than the one running the tuner."""
        recipes = self._recipes(tuner, sample, views=views, seed=seed, augmix=augmix)
        if recipes is None:  # not keyable: encoded, not stored
            built = self._build(tuner, sample, root=root, views=views, seed=seed, augmix=augmix)
            return GatheredViews(sample.content_hash, None, built=built)
        sets = self._stored_sets(sample.content_hash)
        raw = self._read_whole(sets, recipes)
        if raw is not None:
            return GatheredViews(sample.content_hash, recipes, raw=raw)
        stored = self._read_some(sets, recipes)
        started = time.perf_counter()  # the set's `seconds`: making it (building, encoding), not looking it up
        if stored:  # only the views no stored set holds are built (and their images read)
            missing = [i for i in range(len(recipes)) if i not in stored]
            pixels = self._build_some(tuner, sample, root=root, views=views, seed=seed, augmix=augmix,
                                      positions=missing) if missing else None
            return GatheredViews(sample.content_hash, recipes, stored=stored, missing=missing, pixels=pixels,
                                 build_seconds=time.perf_counter() - started)
        built = self._build(tuner, sample, root=root, views=views, seed=seed, augmix=augmix)
        return GatheredViews(sample.content_hash, recipes, built=built, build_seconds=time.perf_counter() - started)

    def finish(self, tuner: Any, gathered: GatheredViews) -> tuple[Any, tuple[str, ...], int]:
        """(raw features, view kinds, how many views were encoded now) from what `gather` left: the built views
        encoded, and the whole set stored for the next run."""
        from difftpt_ops.storage.features import kinds_of

        recipes = gathered.recipes
        if gathered.raw is not None:
            return gathered.raw, kinds_of(recipes), 0
        started = time.perf_counter()
        built = gathered.built
        if built is not None:
            raw, kinds, encoded = tuner.encode_raw(built.pixels), built.kinds, len(built.kinds)
            if recipes is None or kinds != kinds_of(recipes):  # not keyable, or not what the recipes describe
                return raw, kinds, encoded
        else:
            missing = gathered.missing
            fresh = tuner.encode_raw(gathered.pixels) if missing else None
            raw = self._fill(gathered.stored, fresh, missing)  # several sets may hold all of them between them
            kinds, encoded = kinds_of(recipes), len(missing)
        self.store(gathered.sample_hash, recipes, raw,
                   seconds=gathered.build_seconds + time.perf_counter() - started)
        return raw, kinds, encoded

    @staticmethod
    def _fill(stored: dict[int, Any], fresh: Any | None, missing: list[int]) -> Any:
        """Every view's features: the stored rows as read, the fresh ones (encoded now) at `missing`."""
        import torch

        sample_row = next(iter(stored.values()))
        raw = torch.empty((len(stored) + len(missing), sample_row.shape[-1]), dtype=sample_row.dtype)
        for i, row in stored.items():
            raw[i] = row
        if fresh is not None:
            raw[missing] = fresh.to(raw.dtype)
        return raw

    def _stored_sets(self, sample_hash: str) -> list[ViewFeatures]:
        """The stored feature sets of this model for one sample (any views)."""
        with session_scope(self.engine) as session:
            return list(session.scalars(select(ViewFeatures).where(
                ViewFeatures.model_fingerprint == self.model_fingerprint, ViewFeatures.sample_hash == sample_hash)))

    def _read_whole(self, sets: list[ViewFeatures], recipes: Sequence[dict[str, Any]]) -> Any | None:
        """The stored features of exactly these views (from the exact set or any stored set holding them all),
        or None. A damaged entry is discarded (file and row) and reported as missing."""
        from difftpt_ops.storage.features import recipe_key, recipes_fingerprint

        wanted = recipes_fingerprint(recipes)
        keys = [recipe_key(r) for r in recipes]
        for row in sorted(sets, key=lambda row: (row.recipe_fingerprint != wanted, row.n_views)):  # exact, smallest
            position = {recipe_key(v): i for i, v in enumerate(row.views)}
            if not all(key in position for key in keys):
                continue
            tensor = self._read(row)
            if tensor is not None:
                return tensor if row.recipe_fingerprint == wanted else tensor[[position[k] for k in keys]]
        return None

    def _read_some(self, sets: list[ViewFeatures], recipes: Sequence[dict[str, Any]]) -> dict[int, Any]:
        """Position -> stored features (d,) of the views among `recipes` that some stored set holds (each set
        read and checked once; a damaged one is discarded and its views count as missing)."""
        from difftpt_ops.storage.features import recipe_key

        wanted = {recipe_key(r): i for i, r in enumerate(recipes)}
        found: dict[int, Any] = {}
        for row in sorted(sets, key=lambda r: -r.n_views):  # the largest sets first: fewer files to read
            held = {wanted[key]: j for j, key in enumerate(map(recipe_key, row.views))
                    if key in wanted and wanted[key] not in found}
            if not held:
                continue
            tensor = self._read(row)
            if tensor is not None:
                found.update({i: tensor[j] for i, j in held.items()})
        return found

    def store(self, sample_hash: str, recipes: Sequence[dict[str, Any]], raw: Any, *,
              seconds: float | None = None) -> None:
        """Write the file (temp, fsync, publish), then its row; a concurrent writer of the same set is harmless."""
        from difftpt_ops.storage.features import recipes_fingerprint

        artifact = self.files.put(raw)
        if artifact.sha256 != artifact.key.split(".", 1)[0]:  # a damaged copy already sat under this key
            self.files.discard(artifact.key)
            artifact = self.files.put(raw)
        row = {"model_fingerprint": self.model_fingerprint, "sample_hash": sample_hash,
               "recipe_fingerprint": recipes_fingerprint(recipes), "views": list(recipes),
               "n_views": int(raw.shape[0]), "dim": int(raw.shape[1]), "dtype": str(raw.dtype).removeprefix("torch."),
               "artifact_key": artifact.key, "content_hash": artifact.sha256, "size_bytes": artifact.size_bytes,
               "model_name": self.model_name, "seconds": seconds, "created_at": utcnow()}
        with session_scope(self.engine) as session:
            insert_many_ignore(session, ViewFeatures, [row])

    def _read(self, row: ViewFeatures) -> Any | None:
        from difftpt_ops.storage.features import CorruptFeaturesError, StoredFeatures

        try:
            return self.files.read(StoredFeatures(row.artifact_key, row.content_hash, row.size_bytes))
        except (FileNotFoundError, CorruptFeaturesError):
            # Cut short, damaged or deleted: forget it so that this run recomputes and stores it again.
            self.files.discard(row.artifact_key)
            with session_scope(self.engine) as session:
                session.execute(delete(ViewFeatures).where(ViewFeatures.id == row.id))
            return None

    def _build(self, tuner: Any, sample: Any, *, root: Path, views: Any, seed: int, augmix: bool) -> Any:
        """The sample's views (pixels and kinds), as the tuner builds them."""
        from difftpt_ops.data.images import load_rgb

        image = load_rgb(root / sample.relpath, sha256=sample.content_hash)
        generated = views.images_for(sample) if views is not None and tuner.plan.n_generated else []
        with about_one_sample(sample.index):
            return tuner.make_views(image, generated=generated, seed=seed,
                                    sample_key=sample.content_hash or str(sample.id), augmix=augmix)

    def _build_some(self, tuner: Any, sample: Any, *, root: Path, views: Any, seed: int, augmix: bool,
                    positions: list[int]) -> Any:
        """The pixels of the sample's views at `positions`: the source image is read only for its own views and
        crops, the generated images only for generated views."""
        from difftpt_ops.data.images import load_rgb

        def generated(indices: Any) -> list[Any]:  # called only when a generated view is among `positions`
            images = views.images_for(sample)
            return [images[i] for i in indices]

        def source() -> Any:  # called only when the source image's own views or crops are among `positions`
            return load_rgb(root / sample.relpath, sha256=sample.content_hash)

        with about_one_sample(sample.index):
            return tuner.make_some_views(source, generated, positions=positions,
                                         seed=seed, sample_key=sample.content_hash or str(sample.id), augmix=augmix)

    def _generated_hashes(self, views: Any, sample: Any, count: int) -> list[str] | None:
        """Content hashes of the generated images the views use (variants 0..count-1); None when the store
        cannot key this sample (no content hash, or not all of its generated images exist yet)."""
        if not sample.content_hash:
            return None
        if count <= 0 or views is None:
            return []
        with session_scope(self.engine) as session:
            hashes = list(session.scalars(select(GeneratedImage.content_hash).where(
                GeneratedImage.generation_config_id == views.config_id,
                GeneratedImage.source_hash == sample.content_hash, GeneratedImage.variant_index < count)
                .order_by(GeneratedImage.variant_index)))
        return hashes if len(hashes) == count else None


def _reencoded_as(views: Any, sample: Any, generated_hashes: Sequence[str]) -> str | None:
    """The re-encoding of the sample's generated images (`GeneratedViews.reencoded_as`) when it has any. An
    imported file is read as it is but its recipe names the format all the same: that only keys it apart from
    a lossless run's recipe (one more encoding), never gives a view other pixels than its own."""
    return views.reencoded_as(sample) if views is not None and generated_hashes else None


# Per loaded model (weakly held: an evicted model's entry goes with it, so a new model at the same address
# is hashed afresh). The weights of a loaded CLIP are frozen, so its hash never goes stale.
_FINGERPRINTS: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], str]] = weakref.WeakKeyDictionary()


def model_fingerprint_of(clip: Any) -> str:
    """The feature-store fingerprint of a loaded CLIP (weights hash, precision, device, activation), computed
    once per loaded model."""
    from difftpt_ops.storage.features import model_fingerprint

    known = _FINGERPRINTS.setdefault(clip.model, {})
    key = (str(clip.precision), str(clip.device))
    if key not in known:
        known[key] = model_fingerprint(clip.model, precision=str(clip.precision), device=clip.device,
                                       tower_digest=_tower_digest_of(clip))
    return known[key]


def weights_fingerprint_of(clip: Any) -> str:
    """sha256 of every parameter and buffer of a loaded CLIP (both towers, as loaded), computed once per loaded
    model: the weights a run's shards computed with, recorded in their provenance. The spec names a model
    directory or file by its path, whose contents can change between two submits or between two shards."""
    from difftpt_ops.storage.features import clip_weights_digest

    known = _FINGERPRINTS.setdefault(clip.model, {})
    if ("weights", "") not in known:
        known[("weights", "")] = clip_weights_digest(clip.model, _tower_digest_of(clip))
    return known[("weights", "")]


def _tower_digest_of(clip: Any) -> str:
    """The image tower's weights hash, shared by the two fingerprints above (hashed once per loaded model)."""
    from difftpt_ops.storage.features import image_tower, weights_digest

    known = _FINGERPRINTS.setdefault(clip.model, {})
    if ("image_tower", "") not in known:
        known[("image_tower", "")] = weights_digest(image_tower(clip.model))
    return known[("image_tower", "")]


def feature_cache_for(engine: Engine, settings: Settings, clip: Any, method_spec: Any, model_name: str, *,
                      reward: Any = None, reward_name: str | None = None) -> FeatureCache | None:
    """The run's feature cache, or None when its spec says features=recompute. With a method's loaded reward
    CLIP (`reward`, from the folder `reward_name`), the cache keeps that model's features of the views it
    encodes too (`reward_cache`)."""
    if getattr(method_spec, "features", "store") != "store":
        return None
    cache = FeatureCache(engine, settings, model_fingerprint=model_fingerprint_of(clip), model_name=model_name)
    if reward is not None:
        cache.reward_cache = FeatureCache(engine, settings, model_fingerprint=reward_fingerprint_of(reward),
                                          model_name=reward_name or "")
    return cache


def reward_fingerprint_of(clip: Any) -> str:
    """The feature-store fingerprint of a loaded reward CLIP: its image tower as `model_fingerprint_of` hashes
    it, and the way it reads the policy's views (resized bicubically, corners aligned, to its own input size:
    tta.reward), so that its entries never serve as, nor come from, the same CLIP's own views."""
    return fingerprint_of({"reward_of_policy_views": model_fingerprint_of(clip),
                           "resize": "bicubic, align_corners"})


class FeaturesProcessor:
    """A features run: encode and store each sample's views (nothing else is written)."""

    def __init__(self, *, cache: FeatureCache, tuner: Any, root: Path, seed: int, augmix: bool, views: Any) -> None:
        self.cache, self.tuner, self.root, self.seed, self.augmix, self.views = cache, tuner, root, seed, augmix, views

    def finished_ids(self, connection: Connection, samples: Sequence[Any]) -> set[int]:
        """Samples whose views are stored already (exactly this set of views)."""
        from difftpt_ops.storage.features import recipes_fingerprint, view_recipes

        plan = self.tuner.plan
        hashes = [s.content_hash for s in samples if s.content_hash]
        generated = self._generated(connection, hashes, plan.n_generated)
        wanted = {}
        for sample in samples:
            images = generated.get(sample.content_hash, [])
            if sample.content_hash and len(images) == plan.n_generated:
                recipes = view_recipes(n_conventional=plan.n_conventional, generated_hashes=images, seed=self.seed,
                                       augmix=self.tuner.augmix_for(self.augmix), resolution=plan.resolution,
                                       crop_scale=plan.crop_scale,
                                       generated_reencode=_reencoded_as(self.views, sample, images))
                wanted[(sample.content_hash, recipes_fingerprint(recipes))] = sample.id
        if not wanted:
            return set()
        stored = connection.execute(select(ViewFeatures.sample_hash, ViewFeatures.recipe_fingerprint).where(
            ViewFeatures.model_fingerprint == self.cache.model_fingerprint,
            ViewFeatures.sample_hash.in_({h for h, _ in wanted}))).all()
        return {wanted[(h, f)] for h, f in stored if (h, f) in wanted}

    def _generated(self, connection: Connection, hashes: list[str], count: int) -> dict[str, list[str]]:
        """Per source hash, the content hashes of its generated variants 0..count-1, in order."""
        if count <= 0 or self.views is None or not hashes:
            return {}
        found: dict[str, list[str]] = {}
        for source, content in connection.execute(
                select(GeneratedImage.source_hash, GeneratedImage.content_hash).where(
                    GeneratedImage.generation_config_id == self.views.config_id,
                    GeneratedImage.source_hash.in_(hashes), GeneratedImage.variant_index < count)
                .order_by(GeneratedImage.source_hash, GeneratedImage.variant_index)):
            found.setdefault(source, []).append(content)
        return found

    views_ahead: bool = False  # as TuneProcessor's: the shard loop prepares the next sample in a second thread

    def prepare(self, sample: Any) -> Prepared:
        """The sample's stored features read and its other views built (no model), and the seconds it took."""
        if not sample.content_hash:
            raise SampleError(f"sample {sample.index} has no content hash, so its features cannot be keyed")
        started = time.perf_counter()
        gathered = self.cache.gather(self.tuner, sample, root=self.root, views=self.views, seed=self.seed,
                                     augmix=self.augmix)
        return Prepared(gathered, time.perf_counter() - started)

    def process(self, sample: Any, prepared: Prepared | None = None) -> Any:
        prepared = prepared or self.prepare(sample)
        started = time.perf_counter()
        self.cache.finish(self.tuner, prepared.views)
        return prepared.seconds + time.perf_counter() - started

    def write(self, connection: Connection, results: list[Any]) -> None:
        """Nothing to write: the cache stored each sample's file and row as it went."""


def check_views(views: str) -> None:
    if views not in FEATURE_VIEWS:
        raise InputError("--views", views, f"must be one of {', '.join(FEATURE_VIEWS)}")


def submit_features(engine: Engine, settings: Settings, *, dataset_ref: str, model: str = "ViT-B-16",
                    pretrained: str | None = "openai", views: str = "tpt", generation_id: int | None = None,
                    seed: int = 0, limit: int | None = None, shard_size: int | None = None,
                    dispatcher: Any = None, device: str | None = None, progress: Any = None) -> Any:
    """Plan a features run (or attach to the same one) and run or enqueue its shards on the `tune` queue.

    Raises:
        InputError: a bad argument (nothing is written).
    """
    from difftpt_ops.services.running import runs

    check_views(views)
    check_execution_args(limit=limit, shard_size=shard_size, device=device, seed=seed)
    method_spec = method_spec_from(views)
    run_device = resolve_run_device(settings, device)
    model_spec = run_model_spec(model, pretrained, run_device)
    check_model_path(settings, views, model_spec)
    runs._prepare_dispatch(settings, dispatcher)
    with session_scope(engine) as session:
        _, version = runs._resolve_version(session, dataset_ref)
        config = runs._generation_for(session, method_spec, version, dataset_ref, generation_id,
                                       features=True)
        spec = FeaturesRunSpec(views=views, model=model_spec, dataset_fingerprint=version.fingerprint,
                               generation_fingerprint=config.fingerprint if config else None, seed=seed,
                               device=run_device)
        # As a tune run's: the model as the spec names it (a local folder absolute, without a pretrained tag).
        columns = {"model_name": model_spec.name, "pretrained": model_spec.pretrained, "seed": seed,
                   "device": run_device, "precision": model_spec.precision, "settings": f"views={views}"}
        run, created, new = runs._plan(session, kind=FEATURES_KIND, method=FEATURES_KIND,
                                       fingerprint=spec.fingerprint(), spec=spec.to_dict(), version=version,
                                       generation_config_id=config.id if config else None, limit=limit,
                                       shard_size=shard_size or settings.shard_size, columns=columns)
    return runs._start(engine, settings, run, created=created, new=new, dispatcher=dispatcher, device=device,
                       progress=progress)


def build_features_processor(engine: Engine, settings: Settings, run: Run, dataset: Any, *,
                             device: str | None) -> FeaturesProcessor:
    """The processor of a features run (called by the run-context builder)."""
    from difftpt_ops.data.formats import is_cross_domain
    from difftpt_ops.models.clip import load_clip
    from difftpt_ops.tta import prepare_classifier

    spec = FeaturesRunSpec.from_dict(run.spec)
    model = spec.model
    resolved = execution_device(settings, spec.device, device)
    clip = MODELS.get(("clip", model, resolved), lambda: load_clip(model, resolved))
    tuner = prepare_classifier(clip, list(dataset.class_names), spec.method)
    n_generated = tuner.plan.n_generated
    views = generated_views_for(engine, settings, run, spec.method, n_generated)
    cache = FeatureCache(engine, settings, model_fingerprint=model_fingerprint_of(clip), model_name=model.name)
    processor = FeaturesProcessor(cache=cache, tuner=tuner, root=Path(dataset.root), seed=spec.seed,
                                  augmix=is_cross_domain(dataset.format), views=views)
    processor.device, processor.precision = resolved, clip.precision  # type: ignore[attr-defined]
    processor.views_ahead = builds_views_ahead(settings.views_ahead, resolved)
    processor.weights = weights_fingerprint_of(clip)  # type: ignore[attr-defined]
    return processor
