"""CUDA tier: a worker child started with the launcher's environment sees exactly its own GPU.

`difftpt-ops worker` starts one process per GPU with CUDA_VISIBLE_DEVICES set before the interpreter
starts (workers/launcher.py). Here a child gets the environment the launcher builds for one GPU index and
reports what torch sees: one device, and it is that GPU (same UUID as the parent sees at that index); a
CPU child sees none. Celery itself is not needed for this: the environment is what binds the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
_PROBE = ("import json, os, torch; n = torch.cuda.device_count(); "
          "print(json.dumps({'visible': os.environ.get('CUDA_VISIBLE_DEVICES'), 'count': n, "
          "'uuid': str(torch.cuda.get_device_properties(0).uuid) if n else None}))")


def _child_sees(gpu: str | None, tmp_path: Path) -> dict[str, object]:
    from difftpt_ops.config import load_settings
    from workers.launcher import child_env

    settings = load_settings(tmp_path, env={"DIFFTPT_OPS_BROKER_URL": "redis://127.0.0.1:6379/9"})
    done = subprocess.run([sys.executable, "-c", _PROBE], env=child_env(settings, gpu), cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parent_uuids() -> list[str]:
    import torch

    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def test_worker_child_sees_exactly_its_gpu(tmp_path: Path, on_cuda: bool) -> None:
    """The child for GPU i sees one CUDA device, GPU i; the CPU child sees none."""
    cpu = _child_sees(None, tmp_path)
    assert cpu == {"visible": "", "count": 0, "uuid": None}
    if not on_cuda:
        return  # a CPU rehearsal checks the CPU child only
    uuids = _parent_uuids()
    assert uuids, "the parent sees no GPU"
    index = len(uuids) - 1  # the last GPU: with several, binding to 0 by accident would show
    # The launcher names GPUs as this machine does; where the parent is itself restricted, torch's index i
    # is the i-th entry of its CUDA_VISIBLE_DEVICES.
    restricted = os.environ.get("CUDA_VISIBLE_DEVICES")
    name = restricted.split(",")[index].strip() if restricted else str(index)
    child = _child_sees(name, tmp_path)
    assert child == {"visible": name, "count": 1, "uuid": uuids[index]}
