"""Simulate the GPU machine's fixed Python environment on a CPU box, for `DIFFTPT_GPU_CHECK_DEVICE=cpu`.

    python bench/gpu_image_sim.py VENV_DIR [--source SITE_PACKAGES]

Makes a fresh virtual environment holding only the distributions the GPU image has (the list below,
as that image's package list reads), linked from an existing environment's site-packages (default:
this interpreter's), so nothing is downloaded or copied. Everything else — open_clip, diffusers, the
database and settings packages, Celery, MLflow — is absent, as there; bench/gpu_check.sh then installs
the wheel folder into it with `pip install --no-index`, exactly as it does on the GPU machine.
Prints one JSON line: what was linked, and which image packages the source environment lacks.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

# The GPU image's distributions (the device's package list, read 2026-11-17). CUDA runtime wheels are
# named differently per CUDA version, so every nvidia-* and cuda-* distribution counts as present.
IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py
hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def in_image(name: str) -> bool:
    name = normalise(name)
    return name in IMAGE_SET or name.startswith(("nvidia-", "cuda-"))


IMAGE_SET = {normalise(name) for name in IMAGE}
# What the check must bring or do without: never linked, even where an image package's newer release
# here would pull one in.
ABSENT = {normalise(name) for name in (
    "open-clip-torch diffusers ftfy wcwidth importlib-metadata sqlalchemy alembic mako greenlet pydantic "
    "pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection celery kombu billiard "
    "mlflow mlflow-skinny mlflow-tracing redis psycopg psycopg-binary psycopg2").split()}


def requirements(dist: metadata.Distribution) -> set[str]:
    """Names a distribution needs at run time (no extras), as far as its metadata says."""
    from packaging.requirements import Requirement

    names = set()
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.add(normalise(requirement.name))
    return names


def top_levels(dist: metadata.Distribution, site: Path) -> set[str]:
    """The site-packages entries a distribution installed (packages, modules, .libs folders, its dist-info)."""
    entries = set()
    for file in dist.files or []:
        parts = Path(file).parts
        if parts and parts[0] != ".." and (site / parts[0]).exists():
            entries.add(parts[0])
    return entries


def make(venv: Path, source: Path) -> dict[str, object]:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    target.mkdir(parents=True, exist_ok=True)
    dists = {normalise(d.metadata["Name"]): d for d in metadata.distributions(path=[str(source)])
             if d.metadata["Name"]}
    wanted = {name for name in dists if in_image(name)}
    found = set(wanted)
    # The image's packages come with their own needs met; releases here may need packages the image's
    # releases do not (huggingface_hub 2 needs httpx2): link those too, but nothing from ABSENT.
    pending = list(wanted)
    while pending:
        for need in requirements(dists[pending.pop()]):
            if need in dists and need not in wanted and need not in ABSENT:
                wanted.add(need)
                pending.append(need)
    for name in sorted(wanted):
        for entry in top_levels(dists[name], source):
            link = target / entry
            if not link.exists():
                link.symlink_to(source / entry)
    return {"bench": "gpu_image_sim", "venv": str(venv), "python": sys.version.split()[0],
            "linked": sorted(f"{dists[n].metadata['Name']}=={dists[n].version}" for n in found),
            "linked_as_needs": sorted(wanted - found),
            "image_packages_missing_here": sorted(IMAGE_SET - found)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--source", type=Path, default=Path(sysconfig.get_path("purelib")))
    args = parser.parse_args(argv)
    print(json.dumps(make(args.venv.resolve(), args.source.resolve())))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
