"""The GPU tier's device and sizes.

The tier runs on CUDA (skipped without it, tests/conftest.py). `DIFFTPT_OPS_TEST_GPU_DEVICE=cpu` runs the
same tests on the CPU with bf16 in place of fp16 and small sizes: that proves the tests themselves work
(bench/gpu_check.sh's CPU mode) before a GPU is ever used, but it proves nothing about CUDA.
"""

from __future__ import annotations

import os

import pytest

GPU_DEVICE_VARIABLE = "DIFFTPT_OPS_TEST_GPU_DEVICE"


def gpu_device() -> str:
    return os.environ.get(GPU_DEVICE_VARIABLE, "cuda")


@pytest.fixture(scope="session")
def device() -> str:
    """cuda, or cpu when the tier is rehearsed on a CPU."""
    return gpu_device()


@pytest.fixture(scope="session")
def on_cuda(device: str) -> bool:
    return device.startswith("cuda")


@pytest.fixture(scope="session")
def half(on_cuda: bool) -> str:
    """The half precision under test: fp16 on CUDA (what runs there), bf16 on CPU (what CPU autocast has)."""
    return "fp16" if on_cuda else "bf16"
