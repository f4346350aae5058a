"""Per-sample time of every registered episodic method (and DynaPrompt, online) on warm image features, next
to reference TPT.

ViT-B/16 with random weights (speed does not depend on weight values), 200 ImageNet-R classes, synthetic
samples. Each sample's views are built and encoded once per distinct view recipe, before any timing, and
handed to the engine's `Tuner.run_features`, so a method's time is what it costs once its features are
warm (as when they are read from the feature store): the forward-only methods do no image encoding, the
prompt-tuning ones still run the text tower forward and backward. The reference formulation of TPT
(tta/naive.py: every view re-encoded at every step, 77-token prompts) is timed in the same run on the
first sample, from pixels, as the reference code would run it.

    python bench/methods.py                 # CPU, 2 threads, 2 samples (about 5 minutes on 2 cores)
    python bench/methods.py --samples 5 --methods zero,mta

The last line of output is one JSON object: milliseconds per sample per method, the reference TPT time,
each method's fraction of it, and whether every forward-only method is under 1% of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning (see bench/tta_speed.py). Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tta_speed import class_names, synthetic_sample  # noqa: E402

from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.core.specs import ModelSpec  # noqa: E402
from difftpt_ops.models.clip import LoadedClip, load_clip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.engine import Tuner  # noqa: E402
from difftpt_ops.tta.methods import FORWARD_ONLY, ONLINE, registered  # noqa: E402
from difftpt_ops.tta.naive import NaiveTuner  # noqa: E402

FORWARD_REPEATS = 5  # forward-only methods take milliseconds: repeat each sample to average out timer noise
TARGET_FRACTION = 0.01  # forward-only methods: under 1% of the reference TPT time per sample


def episodic_methods(only: list[str] | None) -> list[str]:
    """Every registered episodic method, and the online ones that tune prompts through the text tower
    (DynaPrompt: its cost is the text tower, which bench/online.py's synthetic text features cannot show; here its
    state is carried over the samples, in order). A method that needs a class descriptions file (AWT) is left
    out: the benchmark has none."""
    names = [m.name for m in registered() if (m.kind != ONLINE or getattr(m, "tunes_context", False))
             and not m.requires_descriptions]
    return [n for n in names if n in only] if only else names


def warm_features(tuners: dict[str, Tuner], samples: list[Any]) -> dict[str, list[tuple[torch.Tensor, tuple, Any]]]:
    """Raw image features of every sample's views, encoded once per distinct view recipe, with the views' pixels
    (a method with a reward model encodes its kept views from them: its time includes that)."""
    by_recipe: dict[tuple, list[tuple[torch.Tensor, tuple, Any]]] = {}
    out = {}
    for name, tuner in tuners.items():
        recipe = (tuner.plan.n_conventional, tuner.plan.n_generated, tuner.augmix_for(False), tuner.plan.resolution)
        if recipe not in by_recipe:
            encoded = []
            for i, (image, generated) in enumerate(samples):
                views = tuner.make_views(image, generated=generated, seed=0, sample_key=i)
                encoded.append((tuner.encode_raw(views.pixels), views.kinds, views.pixels))
            by_recipe[recipe] = encoded
        out[name] = by_recipe[recipe]
    return out


def time_method(tuner: Tuner, features: list[tuple[torch.Tensor, tuple, Any]], repeats: int, *, warm: bool) -> float:
    """Mean wall milliseconds of run_features per sample (`warm`: after one untimed call that fills the
    forward-only methods' cached text features; prompt-tuning methods recompute theirs every sample)."""
    if warm:
        tuner.run_features(*features[0][:2], pixels=features[0][2] if tuner.needs_pixels else None)
    times = []
    for raw, kinds, pixels in features:
        for _ in range(repeats):
            start = time.perf_counter()
            tuner.run_features(raw, kinds, pixels=pixels if tuner.needs_pixels else None)
            times.append(time.perf_counter() - start)
    return 1000.0 * float(np.mean(times))


def reference_tpt_ms(clip: LoadedClip, names: list[str], sample: Any) -> float:
    image, generated = sample
    naive = NaiveTuner(clip, names, method_spec_from("tpt"))
    return 1000.0 * naive.run(image, generated=generated, seed=0, sample_key=0).seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered episodic one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    clip = load_clip(ModelSpec(name=args.model, pretrained=None, precision="fp32"), "cpu")
    names = class_names(args.classes)
    methods = episodic_methods(args.methods.split(",") if args.methods else None)
    # A method with a reward model (RLCF) gets the same CLIP as its reward model here (the reference's is ViT-L/14).
    tuners = {name: prepare_classifier(clip, names, method_spec_from(name), reward=clip) for name in methods}
    samples = [synthetic_sample(i, 63) for i in range(args.samples)]
    features = warm_features(tuners, samples)

    ms = {}
    for name, tuner in tuners.items():
        forward = tuner.method.kind == FORWARD_ONLY
        ms[name] = round(time_method(tuner, features[name], FORWARD_REPEATS if forward else 1, warm=forward), 3)
        row = {"method": name, "kind": tuner.method.kind, "ms_per_sample": ms[name]}
        print(json.dumps(row), flush=True)  # noqa: T201
    reference = round(reference_tpt_ms(clip, names, samples[0]), 1)
    fractions = {name: round(value / reference, 6) for name, value in ms.items()}
    forward_only = [name for name in methods if tuners[name].method.kind == FORWARD_ONLY]
    summary = {
        "bench": "methods", "model": args.model, "device": "cpu", "threads": args.threads, "classes": len(names),
        "samples": args.samples, "torch": torch.__version__,
        "features": "encoded once per sample and view recipe, passed to Tuner.run_features (not timed)",
        "ms_per_sample": ms, "reference_tpt_ms": reference, "fraction_of_reference_tpt": fractions,
        "forward_only_under_1pct": all(fractions[name] < TARGET_FRACTION for name in forward_only),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary), flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
