"""Per-sample time of TPT and zero-shot CLIP with a cold feature store (views encoded and stored) and a warm one
(views read back), in one process, on the ViT-B/16 architecture with random weights and 200 ImageNet-R class
names. A cold sample is what a run without stored features pays (image read, views, image encoder); a warm
sample reads the same features and runs only the method (TPT: the text forward and backward).

    python bench/feature_store.py                  # CPU, 2 threads: 1 TPT sample, 3 zero-shot samples
    python bench/feature_store.py --tpt-samples 2

Targets (2-core CPU): TPT warm at least 8x faster than cold, zero-shot warm at least 50x faster, predictions
identical. The store is the real one (SQLite database and artifact files in a temporary workspace).

A third part, `difftpt_after_tpt`, is the partial read: DiffTPT (default views: the original, 64 crops, 63
generated 512 px images imported into the generation cache) on samples whose TPT views are stored. It times
the sample cold (every view built and encoded) and partial (TPT's 64 views read; the 64th crop and the
generated views built and encoded), and, side by side, building all 128 views vs building only the 64
missing ones (what the partial read builds). Targets: partial at least 1.5x faster than cold on the CPU, the
same prediction.

A fourth part, `rlcf_warm`, is RLCF (64 views, 6 kept, 3 steps) with a second CLIP as its reward model
(`--reward-model`, default ViT-L-14 as in the reference; random weights) on samples whose policy views are
stored: `policy_only_s` with the reward model's store empty (the kept views built from the image and encoded
by the reward model, then stored), `warm_s` with both stored (no view built). Target: warm at least 2x faster on
the CPU, the same prediction. `--rlcf-samples 0` leaves it out. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/tta_speed.py: no spinning on a shared box

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tta_speed import class_names  # noqa: E402
from difftpt_ops.config import load_settings  # noqa: E402
from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.core.specs import ModelSpec  # noqa: E402
from difftpt_ops.models.clip import load_clip  # noqa: E402
from difftpt_ops.services.reading.store import store_size  # noqa: E402
from difftpt_ops.services.running.features import FeatureCache, model_fingerprint_of  # noqa: E402
from difftpt_ops.services.workspace import open_database  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402

TARGETS = {"tpt": 8.0, "zeroshot": 50.0, "difftpt_after_tpt": 1.5, "rlcf_warm": 2.0}


def write_samples(root: Path, count: int, offset: int) -> list[SimpleNamespace]:
    """Synthetic 400x300 JPEGs on disk (a run reads its images from files), as sample rows would name them."""
    samples = []
    for i in range(offset, offset + count):
        rng = np.random.default_rng(i)
        relpath = f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(root / relpath, quality=90)
        samples.append(SimpleNamespace(id=i, index=i, relpath=relpath,
                                       content_hash=hashlib.sha256((root / relpath).read_bytes()).hexdigest()))
    return samples


def time_method(method: str, cache: FeatureCache, clip: Any, names: list[str], root: Path,
                samples: list[SimpleNamespace]) -> dict[str, Any]:
    """Cold then warm, sample by sample; the same tuner (its text features are built once, before timing)."""
    tuner = prepare_classifier(clip, names, method_spec_from(method))
    warmup = write_samples(root, 1, offset=1000 + len(method))
    cache.run_sample(tuner, warmup[0], root=root, views=None, seed=0, augmix=False)  # text cache, allocator
    cold, warm, same = [], [], True
    for sample in samples:
        results = []
        for timings in (cold, warm):
            start = time.perf_counter()
            results.append(cache.run_sample(tuner, sample, root=root, views=None, seed=0, augmix=False))
            timings.append(time.perf_counter() - start)
        first, second = results
        assert first.views_encoded == first.n_views and second.views_read == second.n_views
        same = same and (first.pred, first.top5) == (second.pred, second.top5) and bool(
            torch.equal(first.logits, second.logits))
    cold_s, warm_s = float(np.mean(cold)), float(np.mean(warm))
    return {"samples": len(samples), "views": int(tuner.plan.n_views), "cold_s": round(cold_s, 4),
            "warm_s": round(warm_s, 5), "ratio": round(cold_s / warm_s, 1), "target": TARGETS[method],
            "predictions_identical": same}


def difftpt_after_tpt(engine: Any, settings: Any, cache: FeatureCache, clip: Any, names: list[str], root: Path,
                      count: int) -> dict[str, Any]:
    """DiffTPT cold vs partial (TPT's views stored) on `count` registered samples with imported variations."""
    from difftpt_ops.core.specs import GenerationSpec
    from difftpt_ops.db.session import session_scope
    from difftpt_ops.db.tables import Sample
    from difftpt_ops.services.datasets import register_dataset
    from difftpt_ops.services.running.generated_views import GeneratedViews
    from difftpt_ops.services.running.generation import import_generated

    difftpt = prepare_classifier(clip, names, method_spec_from("difftpt"))
    tpt = prepare_classifier(clip, names, method_spec_from("tpt"))
    plan = difftpt.plan
    data, generated_root = root / "difftpt", root / "generated"
    for i in range(count):  # the reference's layout: <class>/<stem>.jpg and <class>/<stem>_<k>.jpg
        rng = np.random.default_rng(500 + i)
        (data / "n0").mkdir(parents=True, exist_ok=True)
        (generated_root / "n0").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(data / "n0" / f"img{i}.jpg")
        for k in range(plan.n_generated):
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(
                generated_root / "n0" / f"img{i}_{k}.jpg", quality=90)
    register_dataset(engine, name="bench-difftpt", root=data, format="imagefolder")
    with session_scope(engine) as session:
        samples = [SimpleNamespace(id=s.id, index=s.index, relpath=s.relpath, content_hash=s.content_hash,
                                   dataset_version_id=s.dataset_version_id)
                   for s in session.query(Sample).order_by(Sample.index)]
    spec = GenerationSpec(model="imported", revision=None, size=512, per_sample=plan.n_generated)
    counts = import_generated(engine, settings, dataset_version_id=samples[0].dataset_version_id,
                              root=generated_root, spec=spec)
    views = GeneratedViews(engine, settings, counts["generation_config_id"], plan.n_generated)
    cold_cache = FeatureCache(engine, settings, model_fingerprint="cold-" + cache.model_fingerprint,
                              model_name="cold")
    cold, partial, build_all, build_missing, same, encoded = [], [], [], [], True, []
    for sample in samples:
        cache.run_sample(tpt, sample, root=data, views=None, seed=0, augmix=False)  # TPT's 64 views stored
        start = time.perf_counter()
        first = cold_cache.run_sample(difftpt, sample, root=data, views=views, seed=0, augmix=False)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        second = cache.run_sample(difftpt, sample, root=data, views=views, seed=0, augmix=False)
        partial.append(time.perf_counter() - start)
        encoded.append(second.views_encoded)
        same = same and (first.pred, first.top5) == (second.pred, second.top5)
        image, images = Image.open(data / sample.relpath), views.images_for(sample)
        start = time.perf_counter()
        difftpt.make_views(image, generated=images, seed=0, sample_key=sample.content_hash)
        build_all.append(time.perf_counter() - start)
        missing = list(range(plan.n_conventional, plan.n_views))  # crop 64 and the generated views
        start = time.perf_counter()
        difftpt.make_some_views(lambda: Image.open(data / sample.relpath), lambda idx: [images[k] for k in idx],
                                positions=missing, seed=0, sample_key=sample.content_hash)
        build_missing.append(time.perf_counter() - start)
        assert second.views_encoded == len(missing), (second.views_encoded, len(missing))
    cold_s, partial_s = float(np.mean(cold)), float(np.mean(partial))
    return {"samples": count, "views": int(plan.n_views), "views_encoded_partial": encoded,
            "cold_s": round(cold_s, 3), "partial_s": round(partial_s, 3), "ratio": round(cold_s / partial_s, 2),
            "target": TARGETS["difftpt_after_tpt"], "build_all_views_s": round(float(np.mean(build_all)), 3),
            "build_missing_views_s": round(float(np.mean(build_missing)), 3), "predictions_identical": same}


def rlcf_warm(engine: Any, settings: Any, cache: FeatureCache, clip: Any, reward_model: str, names: list[str],
              root: Path, samples: list[SimpleNamespace]) -> dict[str, Any]:
    """RLCF on samples whose policy views are stored: first with the reward model's store not yet holding the
    sample's kept views (built, encoded, stored), then holding them (read)."""
    from difftpt_ops.services.running.features import reward_fingerprint_of

    reward = load_clip(ModelSpec(name=reward_model, pretrained=None, precision="fp32"), "cpu")
    tuner = prepare_classifier(clip, names, method_spec_from("rlcf", {"reward_model": reward_model}), reward=reward)
    reward_cache = FeatureCache(engine, settings, model_fingerprint=reward_fingerprint_of(reward),
                                model_name=reward_model)
    policy_only, warm, same, kept = [], [], True, []
    for sample in samples:
        cache.reward_cache = None
        cache.run_sample(tuner, sample, root=root, views=None, seed=0, augmix=False)  # policy views stored, untimed
        results = []
        for timings, store in ((policy_only, reward_cache), (warm, reward_cache)):
            cache.reward_cache = store
            start = time.perf_counter()
            results.append(cache.run_sample(tuner, sample, root=root, views=None, seed=0, augmix=False))
            timings.append(time.perf_counter() - start)
        first, second = results
        assert first.views_read == second.views_read == first.n_views
        kept.append(sum(1 for v in first.views if v.kept))
        same = same and (first.pred, first.top5) == (second.pred, second.top5) and bool(
            torch.equal(first.logits, second.logits))
    cache.reward_cache = None
    policy_s, warm_s = float(np.mean(policy_only)), float(np.mean(warm))
    return {"samples": len(samples), "views": int(tuner.plan.n_views), "kept_views": kept,
            "reward_model": reward_model, "policy_only_s": round(policy_s, 3), "warm_s": round(warm_s, 3),
            "ratio": round(policy_s / warm_s, 2), "target": TARGETS["rlcf_warm"], "predictions_identical": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--tpt-samples", type=int, default=1)
    parser.add_argument("--zeroshot-samples", type=int, default=3)
    parser.add_argument("--difftpt-samples", type=int, default=1, help="0 leaves the partial-read part out")
    parser.add_argument("--rlcf-samples", type=int, default=1, help="0 leaves the RLCF part out")
    parser.add_argument("--reward-model", default="ViT-L-14", help="RLCF's reward CLIP (open_clip architecture)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="difftpt-bench-features-") as tmp:
        workspace = Path(tmp)
        settings = load_settings(workspace, env={"DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none"})
        engine = open_database(settings, auto_upgrade=True)
        clip = load_clip(ModelSpec(name=args.model, pretrained=None, precision="fp32"), "cpu")
        hash_start = time.perf_counter()
        cache = FeatureCache(engine, settings, model_fingerprint=model_fingerprint_of(clip), model_name=args.model)
        fingerprint_s = time.perf_counter() - hash_start
        root = workspace / "images"
        root.mkdir()
        names = class_names(args.classes)
        results = {
            "tpt": time_method("tpt", cache, clip, names, root, write_samples(root, args.tpt_samples, 0)),
            "zeroshot": time_method("zeroshot", cache, clip, names, root,
                                    write_samples(root, args.zeroshot_samples, 100)),
        }
        if args.difftpt_samples:
            results["difftpt_after_tpt"] = difftpt_after_tpt(engine, settings, cache, clip, names, root,
                                                             args.difftpt_samples)
        if args.rlcf_samples:
            results["rlcf_warm"] = rlcf_warm(engine, settings, cache, clip, args.reward_model, names, root,
                                             write_samples(root, args.rlcf_samples, 200))
        size = store_size(engine)
    summary = {
        "bench": "feature_store", "model": args.model, "classes": args.classes, "device": "cpu",
        "threads": args.threads, "torch": torch.__version__, **results,
        "predictions_identical": all(r["predictions_identical"] for r in results.values()),
        "meets_targets": all(r["ratio"] >= r["target"] for r in results.values()),
        "model_fingerprint_s": round(fingerprint_s, 2), "store": size,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary), flush=True)  # noqa: T201 (a benchmark script reports on stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
