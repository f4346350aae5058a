"""What produced a result: software versions, the source commit, the host and the device.

A run stores the environment of the machine that submitted it; each shard stores the environment and
device of the worker that ran it (runs show, the database, MLflow tags). Everything here is read once
per process and cached: a worker reports the same facts for every shard it runs.
"""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("difftpt-ops", "torch", "torchvision", "open_clip_torch", "diffusers", "transformers")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def source_commit() -> dict[str, Any] | None:
    """The git commit of the checkout this package runs from (and whether it has local changes), or None
    when it is installed from a wheel or git is unavailable."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def environment() -> dict[str, Any]:
    """Versions of Python and the libraries that shape results, the commit, the host and CUDA."""
    versions = {package: _version(package) for package in PACKAGES}
    cuda = None
    try:
        import torch

        cuda = torch.version.cuda
        versions["torch"] = torch.__version__  # with its build tag (+cu130, +cpu), which the package lacks
    except ImportError:
        pass
    source = source_commit()
    return {
        "difftpt_ops": versions["difftpt-ops"],
        "git_commit": source["commit"] if source else None,
        "git_dirty": source["dirty"] if source else None,
        "python": platform.python_version(),
        "torch": versions["torch"],
        "torchvision": versions["torchvision"],
        "open_clip": versions["open_clip_torch"],
        "diffusers": versions["diffusers"],
        "transformers": versions["transformers"],
        "cuda": cuda,
        "host": socket.gethostname(),
        "platform": f"{sys.platform}-{platform.machine()}",
    }


@functools.cache
def device_info(device: str) -> dict[str, Any]:
    """The device a process computes on: the CPU model, or the GPU's name, memory and driver."""
    if not device.startswith("cuda"):
        return {"device": device, "device_name": _cpu_model()}
    import torch

    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    return {"device": device, "device_name": props.name,
            "gpu_memory_gb": round(props.total_memory / 2**30, 1), "driver": _nvidia_driver()}


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def worker_provenance(device: str, precision: str | None) -> dict[str, Any]:
    """What a shard records about the process that ran it."""
    return {**environment(), **device_info(device), "precision": precision}
