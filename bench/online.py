"""Throughput of online runs (TDA and DMN-ZS by default) through the job system, with and without checkpoints.

Each method runs a few thousand samples of a 200-class dataset as an online run: embedded (in this
process) and through Celery + Redis (a real worker process), once with the per-shard safetensors
checkpoints and once with them turned off, so that their cost shows as a ratio measured side by side.

What is real: the claims and the chain gate, the engine's online path (`Tuner.run_features`: logits, the
method's step, the per-view scores), the state (de)serialisation, the checkpoint files (written, fsynced,
hashed), the predictions and view scores written to the database, the follow-up tickets. What is
synthetic: the image features (seeded random 512-d vectors per sample stand in for features read warm from
the feature store) and the class text features (200 random 512-d vectors, ViT-B/16's width), on a tiny
random CLIP that only supplies the logit scale. Nothing here depends on weight values.

Targets: >= 200 samples/s embedded; checkpoints cost <= 10%. The cost is measured two ways. `checkpoint_share`:
the time the with-checkpoint runs spend making checkpoints (the method's state_dict, the safetensors bytes,
the hashed and fsynced file), summed over the repeats and divided by those runs' wall time; the target is
judged on it. `checkpoint_cost_ab`: 1 - (best samples/s with) / (best samples/s without), from separate
runs, so it also holds the box's run-to-run noise, which `run_to_run_spread` shows (slowest / fastest - 1
over the runs without checkpoints).

Usage: python bench/online.py [--samples 5000] [--shard-size N] [--repeats 3] [--database-url URL]
       [--redis-url URL] [--skip-celery] [--methods tda,dmn-zs]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

TARGETS = {"embedded_samples_per_s": 200.0, "checkpoint_cost_max": 0.10}
N_CLASSES, DIM = 200, 512
NO_CHECKPOINTS_ENV = "DIFFTPT_BENCH_NO_CHECKPOINTS"  # read by this file's patches only
CHECKPOINT_LOG_ENV = "DIFFTPT_BENCH_CHECKPOINT_LOG"  # a file each checkpoint step appends its seconds to
# The methods measured (--methods), each with its reference defaults for an image folder: TDA 1 view (ImageNet's
# config), DMN-ZS 32, DPE 1 (ImageNet's config, without its views), BoostAdapter 64 (ImageNet-A's).
METHODS: dict[str, dict[str, str]] = {"tda": {}, "dmn-zs": {}}


def say(message: str) -> None:
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


def install_synthetic_features() -> None:
    """Patch the feature source and the text features (in this process) as described in the docstring."""
    import torch

    from difftpt_ops.services.running import checkpoints, features
    from difftpt_ops.tta import engine

    text = torch.nn.functional.normalize(torch.randn(N_CLASSES, DIM, generator=torch.Generator().manual_seed(0)),
                                         dim=-1)

    def gather(self: Any, tuner: Any, sample: Any, **_: Any) -> tuple[Any, tuple[str, ...]]:
        seed = int.from_bytes(hashlib.sha256(str(sample.content_hash).encode()).digest()[:8], "little") >> 1
        n_views = tuner.plan.n_views
        label_direction = text[int(sample.label)]
        raw = label_direction + 0.08 * torch.randn(n_views, DIM, generator=torch.Generator().manual_seed(seed))
        return raw, ("original",) + ("conventional",) * (n_views - 1)

    def finish(self: Any, tuner: Any, gathered: tuple[Any, tuple[str, ...]]) -> tuple[Any, tuple[str, ...], int]:
        return (*gathered, 0)  # none encoded: all "read"

    # The feature store's two halves (`gather` reads and builds, `finish` encodes and stores) give these instead.
    features.FeatureCache.gather = gather  # type: ignore[method-assign]
    features.FeatureCache.finish = finish  # type: ignore[method-assign]
    engine.Tuner._initial_text_features = lambda self: text  # type: ignore[method-assign]
    if os.environ.get(NO_CHECKPOINTS_ENV) == "1":
        checkpoints.encode_checkpoint = lambda state, logits, positions: b""  # type: ignore[assignment]
        checkpoints.put_checkpoint = lambda store, data: {  # type: ignore[assignment]
            "artifact_key": "0" * 64 + ".st", "content_hash": "0" * 64, "size_bytes": 0}
    # The three steps a checkpoint adds (state_dict is only called for checkpoints).
    engine.Tuner.state_dict = _timed(engine.Tuner.state_dict)  # type: ignore[method-assign]
    checkpoints.encode_checkpoint = _timed(checkpoints.encode_checkpoint)  # type: ignore[assignment]
    checkpoints.put_checkpoint = _timed(checkpoints.put_checkpoint)  # type: ignore[assignment]


def _timed(function: Any) -> Any:
    """`function`, appending its seconds per call to the file CHECKPOINT_LOG_ENV names (once: not re-wrapped)."""
    if getattr(function, "bench_timed", False):
        return function

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            path = os.environ.get(CHECKPOINT_LOG_ENV)
            if path:
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(f"{time.perf_counter() - started}\n")

    timed.bench_timed = True  # type: ignore[attr-defined]
    return timed


def checkpoint_seconds(log: Path) -> float:
    """Seconds logged to `log` since it was last emptied; empties it."""
    total = sum(float(line) for line in log.read_text(encoding="utf-8").split()) if log.exists() else 0.0
    log.write_text("", encoding="utf-8")
    return total


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


@dataclass
class Timings:
    """One mode's measurements: best samples/s per configuration, and per method the with-checkpoint runs'
    checkpoint seconds and wall seconds, and the wall seconds of the runs without."""

    best: dict[str, float] = field(default_factory=dict)
    checkpoint_s: dict[str, float] = field(default_factory=dict)
    with_wall_s: dict[str, float] = field(default_factory=dict)
    without_wall_s: dict[str, list[float]] = field(default_factory=dict)

    def add(self, method: str, *, checkpoints: bool, n: int, elapsed: float, checkpoint_s: float) -> None:
        key = method if checkpoints else f"{method}_no_checkpoints"
        self.best[key] = max(self.best.get(key, 0.0), n / elapsed)
        if checkpoints:
            self.checkpoint_s[method] = self.checkpoint_s.get(method, 0.0) + checkpoint_s
            self.with_wall_s[method] = self.with_wall_s.get(method, 0.0) + elapsed
        else:
            self.without_wall_s.setdefault(method, []).append(elapsed)


def measure_embedded(engine: Any, settings: Any, clip: Path, n: int, shard_size: int, *, repeats: int,
                     log: Path) -> Timings:
    """samples/s per method with and without checkpoints, alternating `repeats` times, best of each (the box
    is shared: the best run is the one least disturbed). Every run has its own order seed: a new run."""
    from difftpt_ops.services.running import checkpoints as files

    timings = Timings()
    real = (files.encode_checkpoint, files.put_checkpoint)
    for method in METHODS:
        _submit(engine, settings, method=method, dataset="warm", clip=clip, shard_size=shard_size, order_seed=0)
        for rep in range(repeats):
            for checkpoints in (True, False):
                os.environ[NO_CHECKPOINTS_ENV] = "0" if checkpoints else "1"
                files.encode_checkpoint, files.put_checkpoint = real
                install_synthetic_features()
                checkpoint_seconds(log)
                started = time.perf_counter()
                result = _submit(engine, settings, method=method, dataset="bench", clip=clip, shard_size=shard_size,
                                 order_seed=100 + 2 * rep + (0 if checkpoints else 1))
                elapsed = time.perf_counter() - started
                assert result.state == "finished", result
                timings.add(method, checkpoints=checkpoints, n=n, elapsed=elapsed, checkpoint_s=checkpoint_seconds(log))
                say(f"embedded {method} {'with' if checkpoints else 'without'} checkpoints: {n} samples in "
                    f"{elapsed:.2f} s")
    files.encode_checkpoint, files.put_checkpoint = real
    os.environ.pop(NO_CHECKPOINTS_ENV, None)
    return timings


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
                   workdir: Path, *, repeats: int, log: Path) -> Timings:
    """samples/s per method through a real worker, with and without checkpoints (a worker process each, as the
    patch is per process), alternating `repeats` times, best of each. A warm-up run per worker loads the
    model and the method first, so only the run itself is timed."""
    from workers.tasks import dispatcher_for

    timings = Timings()
    for rep in range(repeats):
        for checkpoints in (True, False):
            seed = 10 + 2 * rep + (0 if checkpoints else 1)
            label = "" if checkpoints else "_no_checkpoints"
            worker = _start_worker(settings, broker, workdir / f"worker{label}_{rep}.log", checkpoints=checkpoints)
            try:
                dispatcher = dispatcher_for(settings)
                for method in METHODS:
                    warm = _submit(engine, settings, method=method, dataset="warm", clip=clip, shard_size=shard_size,
                                   order_seed=seed, dispatcher=dispatcher)
                    wait_finished(engine, warm.run_id)
                    checkpoint_seconds(log)
                    started = time.perf_counter()
                    result = _submit(engine, settings, method=method, dataset="bench", clip=clip,
                                     shard_size=shard_size, order_seed=seed, dispatcher=dispatcher)
                    wait_finished(engine, result.run_id)
                    elapsed = time.perf_counter() - started
                    timings.add(method, checkpoints=checkpoints, n=n, elapsed=elapsed,
                                checkpoint_s=checkpoint_seconds(log))
                    say(f"celery {method} {'with' if checkpoints else 'without'} checkpoints: {n} samples in "
                        f"{elapsed:.2f} s")
            finally:
                worker.terminate()
                worker.wait(timeout=120)
    return timings


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


def summarise(result: dict[str, Timings]) -> dict[str, Any]:
    """The JSON line's measurements: samples/s, then per mode and method the checkpoints' share of the run
    time, the with/without cost and the run-to-run spread."""
    flat: dict[str, Any] = {}
    for mode, timings in result.items():
        for key, value in timings.best.items():
            flat[f"{mode}_{key}_samples_per_s"] = round(value, 1)
    for mode, timings in result.items():
        for m in METHODS:
            flat[f"{mode}_{m}_checkpoint_share"] = round(timings.checkpoint_s[m] / timings.with_wall_s[m], 4)
            flat[f"{mode}_{m}_checkpoint_cost_ab"] = round(1 - timings.best[m] / timings.best[f"{m}_no_checkpoints"],
                                                           3)
            walls = timings.without_wall_s[m]
            flat[f"{mode}_{m}_run_to_run_spread"] = round(max(walls) / min(walls) - 1, 3)
    return flat


def choose_methods(value: str) -> None:
    """Measure these online methods instead of the default two (exit 2 naming a method that is not one)."""
    from difftpt_ops.tta.methods import ONLINE, find_method

    names = [name.strip() for name in value.split(",") if name.strip()]
    for name in names or [value]:
        method = find_method(name)
        if method is None or method.kind != ONLINE:
            sys.stderr.write(f"error: --methods={value}: {name!r} is not an online method\n")
            raise SystemExit(2)
    METHODS.clear()
    METHODS.update({name: {} for name in names})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--shard-size", type=int, default=None,
                        help="samples per shard (default: the settings' online_shard_size, as `submit tune`)")
    parser.add_argument("--database-url", help="default: SQLite in a fresh workspace (the embedded default)")
    parser.add_argument("--redis-url", help="a Redis database of its own (default: a free one on 127.0.0.1:6379)")
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (the best counts)")
    parser.add_argument("--methods", default="tda,dmn-zs", help="comma-separated online methods")
    args = parser.parse_args()
    choose_methods(args.methods)
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
    log = workdir / "checkpoint-seconds.log"
    os.environ[CHECKPOINT_LOG_ENV] = str(log)  # the worker processes inherit it
    install_synthetic_features()
    result = {"embedded": measure_embedded(engine, settings, clip, args.samples, args.shard_size,
                                           repeats=args.repeats, log=log)}
    if not args.skip_celery:
        broker = args.redis_url or _claim_redis("redis://127.0.0.1:6379")
        try:
            celery_settings = load_settings(workdir, env={**env, "DIFFTPT_OPS_BROKER_URL": broker})
            result["celery_redis"] = measure_celery(engine, celery_settings, broker, clip, args.samples,
                                                    args.shard_size, workdir, repeats=args.repeats, log=log)
        finally:
            if not args.redis_url:
                import redis

                redis.Redis.from_url(broker).flushdb()
    flat = summarise(result)
    shares = [value for key, value in flat.items() if key.endswith("_checkpoint_share")]
    slowest = min(result["embedded"].best[m] for m in METHODS)
    met = {"embedded_samples_per_s": slowest >= TARGETS["embedded_samples_per_s"],
           "checkpoint_cost_max": max(shares) <= TARGETS["checkpoint_cost_max"]}
    flat.update(samples=args.samples, classes=N_CLASSES, dim=DIM, shard_size=args.shard_size, repeats=args.repeats,
                database=engine.dialect.name, cpus=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2),
                targets=TARGETS, met=met)
    sys.stdout.write(json.dumps(flat) + "\n")


if __name__ == "__main__":
    main()
