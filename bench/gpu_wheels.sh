#!/usr/bin/env bash
# Download the wheels a GPU machine's fixed Python environment lacks, for an offline install there.
#
#     bash bench/gpu_wheels.sh DIR [PYTHON_VERSION]       # default 3.12 (the GPU image's Python)
#
# The GPU image is assumed to hold torch, torchvision, transformers, accelerate, safetensors, typer, rich,
# pillow and the usual scientific stack (numpy, regex, tqdm, timm, huggingface_hub, zipp, MarkupSafe,
# typing-extensions, pytest, pytest-timeout), but not what is listed below. Each package is pinned to the
# version this project is tested with and fetched with --no-deps, so exactly these files land in DIR and
# nothing in the image is replaced. bench/gpu_check.sh installs them with `pip install --no-index`.
# Put DIR under the repository (`.gpu-wheels/` is ignored by git) so it travels with the working tree.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: bash bench/gpu_wheels.sh DIR [PYTHON_VERSION]" >&2
    exit 2
fi
dir=$1
python_version=${2:-3.12}
pip=${PIP:-python3 -m pip}

# Pinned to the versions resolved in this project's own environment (pyproject.toml's ranges admit them).
# Runtime needs of the engine, the benches and the embedded CLI; no Celery, MLflow or database driver:
# the check runs everything in-process on SQLite with tracking off.
packages=(
    open_clip_torch==3.3.0      # CLIP (needs ftfy; regex, timm, tqdm are in the image)
    ftfy==6.3.1
    wcwidth==0.9.4              # ftfy's only requirement
    diffusers==0.42.1           # the image-variation pipeline (needs importlib_metadata; zipp is in the image)
    importlib_metadata==9.1.0
    SQLAlchemy==2.1.9           # the embedded database (no greenlet: only its asyncio extra needs it)
    alembic==1.20.1             # the schema migrations (needs Mako; MarkupSafe is in the image)
    Mako==1.4.3
    pydantic==2.14.4            # settings (difftpt_ops.config), with pydantic-settings
    pydantic_core==2.50.5
    pydantic-settings==2.16.3
    python-dotenv==1.2.4
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing_extensions==4.16.0   # pydantic needs >= 4.16; newer than the image's is safe to shadow it
)

mkdir -p "$dir"
# pip matches manylinux tags exactly: offer every glibc level a wheel of these packages may carry.
platforms=()
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
$pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${platforms[@]}" -d "$dir" "${packages[@]}"

# One line of JSON: what was fetched and how much it weighs (it travels with the working tree, 64 MiB in all).
python3 - "$dir" "$python_version" <<'EOF'
import json, sys
from pathlib import Path
directory, version = Path(sys.argv[1]), sys.argv[2]
wheels = sorted(directory.glob("*.whl"))
print(json.dumps({"bench": "gpu_wheels", "python_version": version, "dir": str(directory),
                  "wheels": [w.name for w in wheels], "count": len(wheels),
                  "total_mib": round(sum(w.stat().st_size for w in wheels) / 2**20, 2)}))
EOF
