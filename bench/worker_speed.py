"""Per-sample time of tuning runs through the real shard path, with the next sample's views built ahead (in a
second thread) or not: DIFFTPT_OPS_VIEWS_AHEAD=on against off, side by side in one process.

    python bench/worker_speed.py --device cuda                   # ViT-B/16, ImageNet's 1000 classes, TPT, 32 images
    python bench/worker_speed.py --model TINY_DIR --samples 8    # CPU smoke run on a saved tiny model

Each setting runs in its own workspace (database, artifacts), so neither reads the other's stored features; an
architecture name is saved once with seeded random weights as a local model folder that both load (speed does not
depend on the values; the predictions must match). Synthetic 400x300 JPEGs in ImageNet's wnid folders.
Per-sample seconds are the shards' own time (the sample loop, model loading excluded) over the samples; `--set`
passes method settings. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difftpt_ops.config import load_settings  # noqa: E402
from difftpt_ops.data import classnames  # noqa: E402
from difftpt_ops.db.session import session_scope  # noqa: E402
from difftpt_ops.db.tables import Prediction, Shard  # noqa: E402
from difftpt_ops.services.datasets import register_dataset  # noqa: E402
from difftpt_ops.services.running import contexts, runs  # noqa: E402
from difftpt_ops.services.workspace import open_database  # noqa: E402


def write_imagenet_val(root: Path, count: int) -> Path:
    """`count` random 400x300 JPEGs spread over ImageNet's wnid folders (every folder made, as val/ has)."""
    rng = np.random.default_rng(0)
    wnids = classnames.imagenet_wnids()
    for wnid in wnids:
        (root / wnid).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / wnids[i * 7 % len(wnids)] / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)
    return root


def saved_random_clip(name: str, directory: Path) -> Path:
    """Architecture `name` with seeded random weights, saved as a local open_clip folder: both settings load the
    same weights (an architecture name without weights would draw new ones at each load)."""
    import open_clip
    import torch

    from difftpt_ops.models.tiny_clip import TINY_PREPROCESS_CFG, write_clip_folder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None)
    return write_clip_folder(directory, model, open_clip.get_model_config(name), TINY_PREPROCESS_CFG)


def run_once(root: Path, workspace: Path, *, views_ahead: str, method: str, model: str, device: str,
             overrides: dict[str, str], samples: int) -> dict[str, Any]:
    env = {"DIFFTPT_OPS_VIEWS_AHEAD": views_ahead, "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none",
           "DIFFTPT_OPS_DEVICE": device, "DIFFTPT_OPS_SHARD_SIZE": str(samples)}
    settings = load_settings(workspace, env=env)
    engine = open_database(settings, auto_upgrade=True)
    register_dataset(engine, name="val", root=root, format="imagenet")
    contexts.clear_caches()  # each setting loads its model and builds its tuner itself
    started = time.perf_counter()
    result = runs.submit_tune(engine, settings, dataset_ref="val", method=method, model=model, pretrained=None,
                              overrides=overrides, device=device)
    wall = time.perf_counter() - started
    with session_scope(engine) as session:
        shard_seconds = float(session.scalar(select(func.sum(Shard.seconds)).where(Shard.run_id == result.run_id)))
        done, sample_seconds = session.execute(select(func.count(), func.avg(Prediction.seconds))
                                               .where(Prediction.run_id == result.run_id)).one()
        preds = [int(p) for p in session.scalars(select(Prediction.pred).where(Prediction.run_id == result.run_id)
                                                 .order_by(Prediction.sample_index))]
    return {"views_ahead": views_ahead, "state": result.state, "done": int(done),
            "per_sample_s": round(shard_seconds / max(1, int(done)), 4),
            "mean_prediction_seconds": round(float(sample_seconds or 0.0), 4), "wall_s": round(wall, 1),
            "preds": preds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="ViT-B-16", help="an open_clip architecture (random weights) or a folder")
    parser.add_argument("--method", default="tpt")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    overrides = dict(item.split("=", 1) for item in args.overrides)
    with tempfile.TemporaryDirectory(prefix="worker-speed-") as scratch:
        root = write_imagenet_val(Path(scratch) / "val", args.samples)
        model = args.model if Path(args.model).is_dir() else str(saved_random_clip(args.model, Path(scratch) / "clip"))
        rows = [run_once(root, Path(scratch) / f"ws-{setting}", views_ahead=setting, method=args.method,
                         model=model, device=args.device, overrides=overrides, samples=args.samples)
                for setting in ("off", "on")]
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "preds"}), flush=True)  # noqa: T201
    off, on = rows
    summary = {
        "bench": "worker_speed", "device": args.device, "model": args.model, "method": args.method,
        "samples": args.samples, "threads": args.threads, "overrides": overrides, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "per_sample_s": {"off": off["per_sample_s"], "on": on["per_sample_s"]},
        "ratio": round(off["per_sample_s"] / on["per_sample_s"], 2) if on["per_sample_s"] else None,
        "predictions_match": off["preds"] == on["preds"] and off["done"] == on["done"] == args.samples,
    }
    print(json.dumps(summary), flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
