"""The GPU check's engine benches run end to end on the tiny CLIP (CPU): their JSON lines have what the check's
summary reads, and the views-ahead bench's two settings predict the same."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch")

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the benches import each other by module name
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_worker_speed_runs_both_settings_through_the_shard_path(tiny_models_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench("worker_speed").main(["--model", str(tiny_models_dir / "clip"), "--samples", "3",
                                        "--threads", "1", "--set", "n_views=8"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["bench"] == "worker_speed" and summary["predictions_match"] is True
    assert set(summary["per_sample_s"]) == {"off", "on"} and all(v > 0 for v in summary["per_sample_s"].values())


def test_tta_breakdown_reports_phases_and_a_profile(tiny_models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench("tta_breakdown").main(["--model", str(tiny_models_dir / "clip"), "--classes", "20", "--samples",
                                         "1", "--threads", "1", "--methods", "tpt", "--text-groups", "1,4",
                                         "--text-prefix", "shared,whole"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert [(r["text_groups"], r["text_prefix"]) for r in rows] == [(1, "shared"), (4, "shared"), (1, "whole")]
    assert "profile" in rows[0] and all("profile" not in r for r in rows[1:])
    assert rows[2]["text_tokens"] > rows[0]["text_tokens"]  # the prefix runs in every prompt
    assert rows[0]["profile"]["top_self_cpu"] and all(r["views"] > 0 and r["tune"] > 0 for r in rows)
    assert summary["bench"] == "tta_breakdown" and summary["best_pipelined_s"]["tpt"] > 0
