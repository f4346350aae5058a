"""Code and docs cite only what ships in the repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# Design documents that never lived in this repository (spelled in parts so this file does not match itself).
ABSENT = ["architecture" + ".md", "algorithm" + "-reference", "ops" + "-pitfalls", "stack" + "-notes", "style" + ".md",
          "architecture" + " decision"]


def test_no_file_cites_a_design_document_absent_from_the_repository() -> None:
    """No tracked source or doc file mentions the design documents that are not in the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".toml", ".txt", ".ini", ".cfg"} or not path.is_file():
            continue
        text = path.read_text(errors="replace").lower()
        offenders += [f"{name}: {ref}" for ref in ABSENT if ref in text]
    assert offenders == []
