"""bench/gpu_check_env.py's summary line: what the GPU check reports as passed, partial and measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit

STEPS = ("a-install", "b-pytest", "c-tta", "e-cli", "d-generation")


def _module() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_check_env.py"
    spec = importlib.util.spec_from_file_location("gpu_check_env", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(tmp_path: Path, steps: list[dict], results: list[dict]) -> dict:
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return _module().summary(tmp_path / "steps.jsonl", tmp_path / "results.jsonl", "cuda", 0.0)


def test_a_full_run_is_ok_only_when_every_step_passed(tmp_path: Path) -> None:
    passed = [{"step": name, "rc": 0} for name in STEPS]
    assert _summary(tmp_path, passed, [])["ok"] is True
    assert _summary(tmp_path, passed, [])["partial"] == []
    timed_out = [{**step, "rc": 124} if step["step"] == "e-cli" else step for step in passed]
    assert _summary(tmp_path, timed_out, [])["ok"] is False
    deadline = [{"step": s["step"], "skipped": "deadline", "rc": None} if s["step"] == "d-generation" else s
                for s in passed]
    assert _summary(tmp_path, deadline, [])["ok"] is False  # a step the deadline cut is not a pass


def test_a_rerun_of_some_steps_reports_them_and_what_it_left_out(tmp_path: Path) -> None:
    left_out = {"skipped": "not in DIFFTPT_GPU_CHECK_STEPS", "rc": None}
    steps = [{"step": name, **({"rc": 0} if name in ("a-install", "e-cli") else left_out)} for name in STEPS]
    results = [{"step": "e-cli", "cli": "seconds", "command": "submit tune tpt", "seconds": 19.1},
               {"step": "e-cli", "cli": "seconds", "command": "results 3 tpt", "seconds": 9.9},
               {"step": "c-tta", "bench": "tta_breakdown", "rows": [{"method": "tpt"}],
                "best_pipelined_s": {"tpt": 0.11}}]
    summary = _summary(tmp_path, steps, results)
    assert summary["ok"] is True and summary["partial"] == ["b-pytest", "c-tta", "d-generation"]
    assert summary["cli_seconds"] == [["submit tune tpt", 19.1], ["results 3 tpt", 9.9]]
    assert summary["tta_breakdown"] == {"rows": [{"method": "tpt"}], "best_pipelined_s": {"tpt": 0.11}}
    failed = [{**s, "rc": 1} if s["step"] == "e-cli" else s for s in steps]
    assert _summary(tmp_path, failed, results)["ok"] is False
