"""The install command, the constraints file and the library helpers that replaced hand-written code."""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path

import pytest

from difftpt_ops.data.images import hash_file

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _readme_install_command() -> str:
    block = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    return block.group(1).strip()


def test_readme_and_ci_install_the_same_way_with_the_constraints() -> None:
    """README's first command and .ci/run's install line are the same text, and both use constraints.txt."""
    command = _readme_install_command()
    assert "pip install -c constraints.txt -e '.[dev]'" in command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_constraints_pin_what_is_installed() -> None:
    """Every pin in constraints.txt is the installed version (the versions the tests ran with)."""
    pins = [line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert len(pins) > 50
    mismatched = [(name, pinned, metadata.version(name)) for name, pinned in pins
                  if metadata.version(name) != pinned]
    assert mismatched == []
    names = {name.lower().replace("_", "-") for name, _ in pins}
    assert {"torch", "torchvision", "difftpt-ops"}.isdisjoint(names)  # pinned on their own line / the project


def test_every_direct_dependency_is_pinned() -> None:
    """Each requirement of pyproject (runtime and dev) has a pin, torch and torchvision aside."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pinned = {norm(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    required = {norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in metadata.requires("difftpt-ops") or []}
    assert required - {"torch", "torchvision"} - pinned == set()


def test_pyproject_caps_the_majors_known_to_break() -> None:
    """transformers, huggingface_hub, diffusers and mlflow have upper bounds; pandas is not a runtime dependency."""
    requires = metadata.requires("difftpt-ops") or []
    runtime = [r for r in requires if "extra ==" not in r]
    for name in ("transformers", "huggingface_hub", "diffusers", "mlflow"):
        spec = next(r for r in runtime if re.match(rf"{name}\b", r, re.I))
        assert "<" in spec, spec
    assert not any(r.lower().startswith("pandas") for r in runtime)


def test_hash_file_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    """hash_file (hashlib.file_digest) equals sha256 of the whole content, across chunk boundaries."""
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one read
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert hash_file(path) == hashlib.sha256(data).hexdigest()
