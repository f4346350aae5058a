"""Per-sample time of TPT and zero-shot CLIP with a cold feature store (views encoded and stored) and a warm one
(views read back), in one process, on the ViT-B/16 architecture with random weights and 200 ImageNet-R class
names. A cold sample is what a run without stored features pays (image read, views, image encoder); a warm
sample reads the same features and runs only the method (TPT: the text forward and backward).

    python bench/feature_store.py                  # CPU, 2 threads: 1 TPT sample, 3 zero-shot samples
    python bench/feature_store.py --tpt-samples 2

Targets (2-core CPU): TPT warm at least 8x faster than cold, zero-shot warm at least 50x faster, predictions
identical. The store is the real one (SQLite database and artifact files in a temporary workspace). The last
line of output is one JSON object.
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

TARGETS = {"tpt": 8.0, "zeroshot": 50.0}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--tpt-samples", type=int, default=1)
    parser.add_argument("--zeroshot-samples", type=int, default=3)
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
