"""Throughput of online runs (TDA, DMN-ZS) through the job system, with and without checkpoints.

Each method runs a few thousand samples of a 200-class dataset as an online run: embedded (in this
process) and through Celery + Redis (a real worker process), once with the per-shard safetensors
checkpoints and once with them turned off, so that their cost shows as a ratio measured side by side.

What is real: the claims and the chain gate, the engine's online path (`Tuner.run_features`: logits, the
method's step, the per-view scores), the state (de)serialisation, the checkpoint files (written, fsynced,
hashed), the predictions and view scores written to the database, the follow-up tickets. What is
synthetic: the image features (seeded random 512-d vectors per sample stand in for features read warm from
the feature store) and the class text features (200 random 512-d vectors, ViT-B/16's width), on a tiny
random CLIP that only supplies the logit scale. Nothing here depends on weight values.

Targets: >= 200 samples/s embedded; checkpoints cost <= 10% (1 - with / without).

Usage: python bench/online.py [--samples 5000] [--shard-size N] [--repeats 3] [--database-url URL]
       [--redis-url URL] [--skip-celery]
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

TARGETS = {"embedded_samples_per_s": 200.0, "checkpoint_cost_max": 0.10}
N_CLASSES, DIM = 200, 512
NO_CHECKPOINTS_ENV = "DIFFTPT_BENCH_NO_CHECKPOINTS"  # read by this file's patches only
METHODS = {"tda": {}, "dmn-zs": {}}  # reference defaults: TDA 1 view (imagefolder = ImageNet's config), DMN 32


def say(message: str) -> None:
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


def install_synthetic_features() -> None:
    """Patch the feature source and the text features (in this process) as described in the docstring."""
    import torch

    from difftpt_ops.services.running import features, online
    from difftpt_ops.tta import engine

    text = torch.nn.functional.normalize(torch.randn(N_CLASSES, DIM, generator=torch.Generator().manual_seed(0)),
                                         dim=-1)

    def features_for(self: Any, tuner: Any, sample: Any, **_: Any) -> tuple[Any, tuple[str, ...], bool]:
        seed = int.from_bytes(hashlib.sha256(str(sample.content_hash).encode()).digest()[:8], "little") >> 1
        n_views = tuner.plan.n_views
        label_direction = text[int(sample.label)]
        raw = label_direction + 0.08 * torch.randn(n_views, DIM, generator=torch.Generator().manual_seed(seed))
        return raw, ("original",) + ("conventional",) * (n_views - 1), False

    features.FeatureCache.features_for = features_for  # type: ignore[method-assign]
    engine.Tuner._initial_text_features = lambda self: text  # type: ignore[method-assign]
    if os.environ.get(NO_CHECKPOINTS_ENV) == "1":
        online.encode_checkpoint = lambda state, logits, positions: b""  # type: ignore[assignment]
        online.put_checkpoint = lambda store, data: {  # type: ignore[assignment]
            "artifact_key": "0" * 64 + ".st", "content_hash": "0" * 64, "size_bytes": 0}


def add_samples(engine: Any, name: str, n: int, root: Path) -> None:
    from sqlalchemy import insert

    from difftpt_ops.db.session import session_scope
    from difftpt_ops.db.tables import Dataset, DatasetVersion, Sample

    with session_scope(engine) as session:
        dataset = Dataset(name=name, format="imagefolder", root=str(root),
                          class_names=[f"class{i}" for i in range(N_CLASSES)])
        session.add(dataset)
        session.flush()
        version = DatasetVersion(dataset_id=dataset.id, version=1, num_samples=n, num_failed=0,
                                 fingerprint=hashlib.sha256(f"{name}:{n}".encode()).hexdigest())
        session.add(version)
        session.flush()
        session.execute(insert(Sample.__table__), [
            {"dataset_version_id": version.id, "index": i, "relpath": f"c{i % N_CLASSES}/{i}.jpg",
             "label": (i * 7) % N_CLASSES, "content_hash": hashlib.sha256(f"{name}:{i}".encode()).hexdigest(),
             "status": "ok"} for i in range(n)])


def wait_finished(engine: Any, run_id: int, timeout: float = 1800.0) -> None:
    from sqlalchemy import select

    from difftpt_ops.db.session import session_scope
    from difftpt_ops.db.tables import Run

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(engine) as session:
            state = session.scalar(select(Run.state).where(Run.id == run_id))
        if state in {"finished", "finished_with_failures", "failed", "cancelled"}:
            if state != "finished":
                raise RuntimeError(f"run {run_id} ended {state}")
            return
        time.sleep(0.05)
    raise TimeoutError(f"run {run_id} did not finish in {timeout} s")


def _submit(engine: Any, settings: Any, *, method: str, dataset: str, clip: Path, shard_size: int,
            order_seed: int, dispatcher: Any = None) -> Any:
    from difftpt_ops.services.running import runs

    overrides = {**METHODS[method], "order_seed": str(order_seed)}
    return runs.submit_tune(engine, settings, dataset_ref=dataset, method=method, model=str(clip), pretrained=None,
                            shard_size=shard_size, overrides=overrides, dispatcher=dispatcher)


def measure_embedded(engine: Any, settings: Any, clip: Path, n: int, shard_size: int, *,
                     repeats: int) -> dict[str, float]:
    """samples/s per method with and without checkpoints, alternating `repeats` times, best of each (the box
    is shared: the best run is the one least disturbed). Every run has its own order seed: a new run."""
    from difftpt_ops.services.running import online

    best: dict[str, float] = {}
    real = (online.encode_checkpoint, online.put_checkpoint)
    for method in METHODS:
        _submit(engine, settings, method=method, dataset="warm", clip=clip, shard_size=shard_size, order_seed=0)
        for rep in range(repeats):
            for label, checkpoints in (("", True), ("_no_checkpoints", False)):
                os.environ[NO_CHECKPOINTS_ENV] = "0" if checkpoints else "1"
                online.encode_checkpoint, online.put_checkpoint = real
                install_synthetic_features()
                started = time.perf_counter()
                result = _submit(engine, settings, method=method, dataset="bench", clip=clip, shard_size=shard_size,
                                 order_seed=100 + 2 * rep + (0 if checkpoints else 1))
                elapsed = time.perf_counter() - started
                assert result.state == "finished", result
                best[f"{method}{label}"] = max(best.get(f"{method}{label}", 0.0), n / elapsed)
                say(f"embedded {method}{label or ' with checkpoints'}: {n} samples in {elapsed:.2f} s")
    online.encode_checkpoint, online.put_checkpoint = real
    os.environ.pop(NO_CHECKPOINTS_ENV, None)
    return best


_WORKER = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)  # as the embedded measurement: OpenMP threads only spin on a shared 2-core box
from bench.online import install_synthetic_features
install_synthetic_features()
from celery.bin.celery import main
sys.argv = ["celery", "-A", "workers.celery_app", "worker", "-P", "solo", "--prefetch-multiplier", "1",
            "-c", "1", "-Q", "tune", "-n", "bench-online@%h", "--without-gossip", "--without-mingle"]
main()
"""


def measure_celery(engine: Any, settings: Any, broker: str, clip: Path, n: int, shard_size: int,
                   workdir: Path, *, repeats: int) -> dict[str, float]:
    """samples/s per method through a real worker, with and without checkpoints (a worker process each, as the
    patch is per process), alternating `repeats` times, best of each. A warm-up run per worker loads the
    model and the method first, so only the run itself is timed."""
    from workers.tasks import dispatcher_for

    best: dict[str, float] = {}
    for rep in range(repeats):
        for label, checkpoints in (("", True), ("_no_checkpoints", False)):
            seed = 10 + 2 * rep + (0 if checkpoints else 1)
            worker = _start_worker(settings, broker, workdir / f"worker{label}_{rep}.log", checkpoints=checkpoints)
            try:
                dispatcher = dispatcher_for(settings)
                for method in METHODS:
                    warm = _submit(engine, settings, method=method, dataset="warm", clip=clip, shard_size=shard_size,
                                   order_seed=seed, dispatcher=dispatcher)
                    wait_finished(engine, warm.run_id)
                    started = time.perf_counter()
                    result = _submit(engine, settings, method=method, dataset="bench", clip=clip,
                                     shard_size=shard_size, order_seed=seed, dispatcher=dispatcher)
                    wait_finished(engine, result.run_id)
                    elapsed = time.perf_counter() - started
                    best[f"{method}{label}"] = max(best.get(f"{method}{label}", 0.0), n / elapsed)
                    say(f"celery {method}{label or ' with checkpoints'}: {n} samples in {elapsed:.2f} s")
            finally:
                worker.terminate()
                worker.wait(timeout=120)
    return best


def _start_worker(settings: Any, broker: str, log: Path, *, checkpoints: bool) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")}
    env.update({"DIFFTPT_OPS_WORKSPACE": str(settings.workspace), "DIFFTPT_OPS_DATABASE_URL": settings.database_url,
                "DIFFTPT_OPS_BROKER_URL": broker, "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none",
                "DIFFTPT_OPS_DEVICE": "cpu", "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "",
                "OMP_NUM_THREADS": "1", NO_CHECKPOINTS_ENV: "0" if checkpoints else "1"})
    with log.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-c", _WORKER, str(REPO_ROOT)], env=env, cwd=REPO_ROOT,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _claim_redis(base: str) -> str:
    import redis

    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{base}/{number}")
        if client.dbsize() == 0 and client.set("difftpt-bench-claim", "1", nx=True, ex=3600):
            return f"{base}/{number}"
    raise RuntimeError("no empty Redis database; pass --redis-url")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--shard-size", type=int, default=None,
                        help="samples per shard (default: the settings' online_shard_size, as `submit tune`)")
    parser.add_argument("--database-url", help="default: SQLite in a fresh workspace (the embedded default)")
    parser.add_argument("--redis-url", help="a Redis database of its own (default: a free one on 127.0.0.1:6379)")
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (the best counts)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from difftpt_ops.config import load_settings
    from difftpt_ops.db.session import upgrade
    from difftpt_ops.models.tiny import make_tiny_models
    from difftpt_ops.services.workspace import open_database

    workdir = Path(tempfile.mkdtemp(prefix="difftpt-bench-online-"))
    make_tiny_models(workdir / "models")
    clip = workdir / "models" / "clip"
    (workdir / "images").mkdir()
    env = {"DIFFTPT_OPS_DATABASE_URL": args.database_url or f"sqlite:///{workdir / 'difftpt.db'}",
           "DIFFTPT_OPS_MLFLOW_TRACKING_URI": "none", "DIFFTPT_OPS_DEVICE": "cpu"}
    settings = load_settings(workdir, env=env)
    args.shard_size = args.shard_size or settings.online_shard_size
    engine = open_database(settings, auto_upgrade=True)
    upgrade(engine)
    add_samples(engine, "warm", 2 * args.shard_size, workdir / "images")
    add_samples(engine, "bench", args.samples, workdir / "images")
    install_synthetic_features()
    result: dict[str, Any] = {"embedded": measure_embedded(engine, settings, clip, args.samples, args.shard_size,
                                                           repeats=args.repeats)}
    if not args.skip_celery:
        broker = args.redis_url or _claim_redis("redis://127.0.0.1:6379")
        try:
            celery_settings = load_settings(workdir, env={**env, "DIFFTPT_OPS_BROKER_URL": broker})
            result["celery_redis"] = measure_celery(engine, celery_settings, broker, clip, args.samples,
                                                    args.shard_size, workdir, repeats=args.repeats)
        finally:
            if not args.redis_url:
                import redis

                redis.Redis.from_url(broker).flushdb()
    flat: dict[str, Any] = {}
    for mode, values in result.items():
        for key, value in values.items():
            flat[f"{mode}_{key}_samples_per_s"] = round(value, 1)
    costs = {f"{mode}_{m}_checkpoint_cost": round(1 - values[m] / values[f"{m}_no_checkpoints"], 3)
             for mode, values in result.items() for m in METHODS}
    slowest = min(result["embedded"][m] for m in METHODS)
    met = {"embedded_samples_per_s": slowest >= TARGETS["embedded_samples_per_s"],
           "checkpoint_cost_max": max(costs.values()) <= TARGETS["checkpoint_cost_max"]}
    flat.update(costs)
    flat.update(samples=args.samples, classes=N_CLASSES, dim=DIM, shard_size=args.shard_size, repeats=args.repeats,
                database=engine.dialect.name, cpus=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2),
                targets=TARGETS, met=met)
    sys.stdout.write(json.dumps(flat) + "\n")


if __name__ == "__main__":
    main()
