"""Where one sample's time goes in the engine: its phases, the profiler's top operations, and the settings that
do not change results (text length groups, view threads, building the next sample's views during this one's
tuning, the shared or whole text prompts).

    python bench/tta_breakdown.py --device cuda                    # ViT-B/16, 1000 classes, TPT and DiffTPT
    python bench/tta_breakdown.py --model TINY_DIR --classes 200   # CPU smoke run on a saved tiny model

Phases are timed with the device synchronised at each boundary: `views` (built on the CPU), `encode` (the image
encoder on the views), `tune` (selection, tuning steps and prediction: `Tuner.run_features`). `pipelined_s` is
the wall time per sample over a stream in which one thread builds the next sample's views while the current
sample encodes and tunes. The profiler rows are from one sample's `run_features`. Random weights (speed does not
depend on their values). The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tta_speed import class_names, synthetic_sample  # noqa: E402

from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.core.specs import ModelSpec  # noqa: E402
from difftpt_ops.models.clip import load_clip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.engine import Tuner  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clock(device: str) -> float:
    _sync(device)
    return time.perf_counter()


def phases(tuner: Tuner, inputs: list[Any], device: str) -> dict[str, float]:
    """Mean seconds per sample of each phase, synchronised at each boundary."""
    totals = {"views": 0.0, "encode": 0.0, "tune": 0.0}
    for key, (image, generated) in enumerate(inputs):
        start = _clock(device)
        views = tuner.make_views(image, generated=generated, seed=0, sample_key=key)
        built = _clock(device)
        raw = tuner.encode_raw(views.pixels)
        encoded = _clock(device)
        tuner.run_features(raw, views.kinds, pixels=views.pixels)
        done = _clock(device)
        totals["views"] += built - start
        totals["encode"] += encoded - built
        totals["tune"] += done - encoded
    return {name: round(value / len(inputs), 4) for name, value in totals.items()}


def pipelined(tuner: Tuner, inputs: list[Any], device: str) -> float:
    """Seconds per sample when the next sample's views are built while the current one runs."""
    def build(key: int) -> Any:
        image, generated = inputs[key]
        return tuner.make_views(image, generated=generated, seed=0, sample_key=key)

    start = _clock(device)
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(build, 0)
        for key in range(len(inputs)):
            views = upcoming.result()
            if key + 1 < len(inputs):
                upcoming = pool.submit(build, key + 1)
            tuner.run_views(views)
    return round((_clock(device) - start) / len(inputs), 4)


def profiled(tuner: Tuner, sample: Any, device: str, rows: int) -> dict[str, Any]:
    """The top operations of one sample's `run_features` (self time), and how many kernels it launched."""
    image, generated = sample
    views = tuner.make_views(image, generated=generated, seed=0, sample_key=0)
    raw = tuner.encode_raw(views.pixels)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        tuner.run_features(raw, views.kinds, pixels=views.pixels)
        _sync(device)
    averages = prof.key_averages()

    def device_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))

    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                            "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in averages if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
    by_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    by_device = sorted(averages, key=device_us, reverse=True)[:rows] if device == "cuda" else []
    return {
        "kernel_launches": launches,
        "memcpy_or_sync_calls": syncs,
        "device_busy_ms": round(sum(device_us(e) for e in averages) / 1000, 2) if device == "cuda" else None,
        "top_self_cpu": [[e.key, e.count, round(e.self_cpu_time_total / 1000, 2)] for e in by_cpu],
        "top_self_device": [[e.key, e.count, round(device_us(e) / 1000, 2)] for e in by_device],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--methods", default="tpt,difftpt")
    parser.add_argument("--samples", type=int, default=4, help="timed samples per setting (after one warm-up)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--view-workers", default="8", help="comma list of view-building thread counts")
    parser.add_argument("--text-groups", default="1,4", help="comma list of max_text_groups (the first is profiled)")
    parser.add_argument("--text-prefix", default="shared", help="comma list of shared (the [SOS][ctx] prefix run "
                        "once) and whole (every prompt run whole, cut after its end token), each with the first group")
    parser.add_argument("--profile-rows", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    clip = load_clip(ModelSpec(name=args.model, pretrained=None, precision="auto"), args.device)
    names = class_names(args.classes)
    inputs = [synthetic_sample(i, 63) for i in range(args.samples + 1)]
    groups = [int(g) for g in args.text_groups.split(",")]
    workers = [int(w) for w in args.view_workers.split(",")]
    rows = []
    prefixes = args.text_prefix.split(",")
    # (text groups, view threads, prefix): every group count with the first thread count and prefix, the other
    # thread counts and prefixes with the first group count.
    settings = ([(g, workers[0], prefixes[0]) for g in groups] + [(groups[0], w, prefixes[0]) for w in workers[1:]]
                + [(groups[0], workers[0], p) for p in prefixes[1:]])
    for method in args.methods.split(","):
        spec = method_spec_from(method)
        for index, (group_count, view_workers, prefix) in enumerate(settings):
            tuner = prepare_classifier(clip, names, spec, max_text_groups=group_count, view_workers=view_workers,
                                       share_text_prefix=prefix == "shared")
            phases(tuner, inputs[:1], args.device)  # warm-up: kernel selection, allocator
            row: dict[str, Any] = {"method": method, "classes": args.classes, "text_groups": group_count,
                                   "view_workers": view_workers, "text_prefix": prefix,
                                   "text_tokens": tuner.learner.token_count, **phases(tuner, inputs[1:], args.device)}
            row["total_s"] = round(row["views"] + row["encode"] + row["tune"], 4)
            row["pipelined_s"] = pipelined(tuner, inputs[1:], args.device)
            if index == 0:
                row["profile"] = profiled(tuner, inputs[1], args.device, args.profile_rows)
            print(json.dumps(row), flush=True)  # noqa: T201 (a benchmark reports on stdout)
            rows.append(row)
    summary = {
        "bench": "tta_breakdown", "model": args.model, "device": args.device, "threads": args.threads,
        "samples": args.samples, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "rows": [{k: r[k] for k in ("method", "text_groups", "view_workers", "text_prefix", "views", "encode", "tune",
                                    "total_s", "pipelined_s")} for r in rows],
        "best_pipelined_s": {m: min(r["pipelined_s"] for r in rows if r["method"] == m)
                             for m in args.methods.split(",")},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary), flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
