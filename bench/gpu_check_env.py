"""Helpers of bench/gpu_check.sh; each prints one JSON line.

    python bench/gpu_check_env.py                         # the environment: Python, torch, CUDA, GPU, packages
    CMD --json | python bench/gpu_check_env.py --condense NAME     # one line of a CLI command's JSON output
    python bench/gpu_check_env.py --summary STEPS RESULTS DEVICE STARTED   # the check's summary line

Standard library only, except torch for the environment report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "safetensors", "huggingface_hub", "numpy",
            "open_clip_torch", "diffusers", "ftfy", "SQLAlchemy", "alembic", "pydantic", "pydantic-settings",
            "typer", "rich", "pillow", "pytest", "timm")
MUST_BE_ABSENT = ("celery", "mlflow", "psycopg", "redis")  # the check runs without broker, tracking or driver
CONDENSED = ("run_id", "kind", "method", "state", "created", "num_samples", "done", "failed", "pending", "top1",
             "top5", "zeroshot_top1", "mean_seconds", "generation_config_id", "status", "clip", "diffusion")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "check": "environment", "python": platform.python_version(), "executable": sys.executable,
        "torch_cuda": torch.version.cuda, "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "packages": {name: _version(name) for name in PACKAGES},
        "importable_service_packages": [name for name in MUST_BE_ABSENT if importlib.util.find_spec(name)],
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        report["capability"] = f"{props.major}.{props.minor}"
    return report


def condense(name: str, text: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except ValueError:
        return {"cli": name, "error": "not JSON", "output_tail": text[-500:]}
    if not isinstance(payload, dict):
        return {"cli": name, "items": len(payload) if isinstance(payload, list) else None}
    return {"cli": name, **{key: payload[key] for key in CONDENSED if key in payload}}


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pytest_counts(log: Path) -> dict[str, int]:
    """The counts of pytest's closing line ("3 passed, 1 skipped in 9.1s")."""
    if not log.is_file():
        return {}
    lines = [line for line in log.read_text(errors="replace").splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return {word: int(count) for count, word in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def summary(steps_file: Path, results_file: Path, device: str, started: float) -> dict[str, Any]:
    steps = _records(steps_file)
    results = _records(results_file)
    out = results_file.parent
    headline: dict[str, Any] = {"pytest_gpu": _pytest_counts(out / "b-pytest.log"),
                                "pytest_light_imports": _pytest_counts(out / "a-install.log")}
    for record in results:
        if record.get("bench") == "tta_speed" and "results" in record:
            headline["tta"] = {key: {k: row.get(k) for k in ("fast_s", "fast_view_s", "naive_s", "ratio",
                                                              "predictions_match", "fast_cuda_peak_mb")}
                               for key, row in record["results"].items()}
            headline["tta_meets_targets"] = record.get("meets_targets")
            headline["tta_peak_cuda_mb"] = record.get("peak_cuda_mb")
        elif record.get("bench") == "generation_speed":
            headline["generation"] = {k: record.get(k) for k in (
                "gpu", "arch", "size", "steps", "reference_images_per_s", "ours_images_per_s", "ratio",
                "meets_target")}
            headline["generation"]["best"] = {k: record.get("ours", {}).get(k) for k in (
                "variant", "images_per_call", "peak_cuda_mb")}
            headline["generation"]["variants"] = [
                {k: v for k, v in row.items() if k in ("variant", "images_per_call", "images_per_s", "peak_cuda_mb",
                                                       "compile_overhead_s", "pays_back_after_images", "skipped",
                                                       "error")} for row in record.get("variants", [])]
        elif record.get("cli", "").startswith("results-"):
            headline.setdefault("cli_results", {})[record["cli"].removeprefix("results-")] = {
                k: record.get(k) for k in ("done", "failed", "top1", "mean_seconds")}
        elif record.get("bench") == "worker_speed":
            headline["worker_speed"] = {k: record.get(k) for k in ("method", "samples", "per_sample_s", "ratio",
                                                                   "predictions_match")}
        elif record.get("bench") == "tta_breakdown":
            headline["tta_breakdown"] = {k: record.get(k) for k in ("rows", "best_pipelined_s")}
        elif record.get("cli") == "seconds":
            headline.setdefault("cli_seconds", []).append([record["command"], record["seconds"]])
        elif record.get("check") == "environment":
            headline["environment"] = {k: record.get(k) for k in ("python", "torch_cuda", "gpus", "gpu_memory_gib",
                                                                   "importable_service_packages")}
            headline["environment"]["torch"] = record.get("packages", {}).get("torch")
    # A rerun of some steps (DIFFTPT_GPU_CHECK_STEPS) is ok when the steps it ran passed; `partial` says so.
    left_out = [step["step"] for step in steps if step.get("skipped") == "not in DIFFTPT_GPU_CHECK_STEPS"]
    ok = len(steps) == 5 and all(step.get("rc") == 0 for step in steps if step["step"] not in left_out)
    return {"check": "gpu_check", "device": device, "ok": ok, "partial": left_out,
            "seconds": round(time.time() - started, 1),
            "steps": {step["step"]: {k: v for k, v in step.items() if k != "step"} for step in steps},
            **headline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--condense", metavar="NAME")
    parser.add_argument("--summary", nargs=4, metavar=("STEPS", "RESULTS", "DEVICE", "STARTED"))
    args = parser.parse_args(argv)
    if args.condense:
        record = condense(args.condense, sys.stdin.read())
    elif args.summary:
        steps, results, device, started = args.summary
        record = summary(Path(steps), Path(results), device, float(started))
    else:
        record = environment()
    print(json.dumps(record))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
