"""The engine, the model loaders and the benches import on a machine without Celery, MLflow or a database.

A GPU box often has a fixed Python environment: bench/gpu_check.sh carries only open_clip, diffusers and
the embedded database's packages there. A child interpreter hides the service packages as if they were not
installed (imports fail, and the availability probes other libraries use say "absent"), then imports
everything the GPU check runs before the CLI step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
HIDDEN = ("celery", "kombu", "billiard", "mlflow", "mlflow_skinny", "redis", "psycopg", "psycopg2", "psycopg_binary",
          "pymysql", "sqlalchemy", "alembic")

# Runs in the child. A meta-path finder alone would make `import mlflow` fail, but libraries ask
# importlib.util.find_spec / importlib.metadata whether an optional package exists (transformers and
# diffusers do for mlflow): answer those as an environment without the package would.
_CHILD = textwrap.dedent("""
    import importlib.abc, importlib.metadata, importlib.util, sys
    HIDDEN = set(sys.argv[1].split(","))

    def hidden(name):
        return name.split(".")[0].replace("-", "_").lower() in HIDDEN

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if hidden(name):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    _find_spec, _version, _distribution = importlib.util.find_spec, importlib.metadata.version, \\
        importlib.metadata.distribution

    def find_spec(name, package=None):
        return None if hidden(name) else _find_spec(name, package)

    def version(name):
        if hidden(name):
            raise importlib.metadata.PackageNotFoundError(name)
        return _version(name)

    def distribution(name):
        if hidden(name):
            raise importlib.metadata.PackageNotFoundError(name)
        return _distribution(name)

    importlib.util.find_spec, importlib.metadata.version, importlib.metadata.distribution = \\
        find_spec, version, distribution

    try:
        import mlflow
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the hiding does not work: mlflow imported")

    import importlib as il
    for module in sys.argv[2].split(","):
        il.import_module(module)
    for script in sys.argv[3].split(","):
        spec = importlib.util.spec_from_file_location("bench_" + script.rsplit("/", 1)[-1][:-3], script)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    from diffusers import StableDiffusionImageVariationPipeline  # lazy in diffusers: resolve it now
    import open_clip
    open_clip.create_model("ViT-B-16", pretrained=None)  # the real architecture builds offline
    leaked = sorted(name for name in sys.modules if hidden(name))
    print("LEAKED", leaked)
    raise SystemExit(1 if leaked else 0)
""")

MODULES = ("difftpt_ops.tta", "difftpt_ops.tta.naive", "difftpt_ops.models.clip", "difftpt_ops.models.diffusion",
           "difftpt_ops.models.tiny", "difftpt_ops.models.tiny_clip", "difftpt_ops.models.tiny_diffusion",
           "difftpt_ops.core.specs", "difftpt_ops.core.method_specs", "difftpt_ops.core.run_specs")
BENCHES = ("bench/tta_speed.py", "bench/tta_breakdown.py", "bench/generation_speed.py")


def test_engine_and_benches_import_without_celery_mlflow_or_a_database() -> None:
    """Importing the engine, the loaders and the benches pulls in no broker, tracking or database package."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, ",".join(HIDDEN), ",".join(MODULES), ",".join(BENCHES)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        # Keep PYTHONPATH: on a GPU machine the carried wheels are installed into a folder it names.
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "LEAKED []" in done.stdout


def test_silencing_the_library_bars_works_in_a_fresh_process() -> None:
    """First thing in a new process (the demo, a worker): no library imported yet, so nothing may rely on a
    subpackage another import happened to load (`huggingface_hub.utils` is not an attribute until imported)."""
    done = subprocess.run(
        [sys.executable, "-c", "from difftpt_ops.models.quiet import silence_library_progress_bars as s; s(); "
                               "print('SILENCED')"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)},
    )
    assert done.returncode == 0 and "SILENCED" in done.stdout, done.stderr[-4000:]
