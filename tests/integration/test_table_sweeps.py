"""Sweeps and seeds through the CLI, and `table` on what they made: SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from cli.main import app
from difftpt_ops.core.errors import InputError
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Run, Sweep, SweepRun
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.running.sweeps import _check_plan, grid_points, parse_seeds, parse_sweep
from tests.integration.test_jobs_support import add_dataset, make_settings, open_engine

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(cli_env: dict[str, str], workspace: Path, database_url: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DIFFTPT_OPS_MLFLOW_TRACKING_URI", "none")
    monkeypatch.setattr(reporting, "_next_report", {})
    engine = open_engine(make_settings(workspace, database_url, mlflow_tracking_uri="none"))
    add_dataset(engine, "toy", 12)
    return engine


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _count(engine, model) -> int:  # type: ignore[no-untyped-def]
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


SWEEP = ("submit", "tune", "--dataset", "toy", "--method", "noop", "--sweep", "resolution=224,256",
         "--seeds", "0,1", "--json")


def test_two_by_two_sweep_makes_four_runs_and_resubmitting_makes_none(engine) -> None:  # type: ignore[no-untyped-def]
    """2 values x 2 seeds = 4 finished runs in one sweep; the same command again attaches to all four."""
    code, out = _invoke(*SWEEP)
    assert code == 0, out
    first = json.loads(out)
    assert (first["runs"], first["new_runs"], first["created"]) == (4, 4, True)
    assert sorted((p["point"]["resolution"], p["point"]["seed"]) for p in first["points"]) == [
        ("224", 0), ("224", 1), ("256", 0), ("256", 1)]
    assert {p["state"] for p in first["points"]} == {"finished"}
    code, out = _invoke(*SWEEP)
    again = json.loads(out)
    assert code == 0 and (again["sweep_id"], again["new_runs"], again["created"]) == (first["sweep_id"], 0, False)
    assert sorted(p["run_id"] for p in again["points"]) == sorted(p["run_id"] for p in first["points"])
    assert (_count(engine, Run), _count(engine, Sweep), _count(engine, SweepRun)) == (4, 1, 4)


def test_runs_list_groups_sweep_runs(engine) -> None:  # type: ignore[no-untyped-def]
    """`runs list` names each run's sweep and grid point; `--sweep N` lists only that sweep's runs."""
    _invoke(*SWEEP)
    _invoke("submit", "tune", "--dataset", "toy", "--method", "noop", "--seed", "9", "--json")
    code, out = _invoke("runs", "list", "--json")
    runs = json.loads(out)
    assert code == 0 and len(runs) == 5
    swept = [r for r in runs if r["sweeps"]]
    assert len(swept) == 4 and all(r["point"]["resolution"] in {"224", "256"} for r in swept)
    code, out = _invoke("runs", "list", "--sweep", str(swept[0]["sweeps"][0]), "--json")
    assert code == 0 and len(json.loads(out)) == 4
    code, out = _invoke("runs", "list")
    assert code == 0 and "sweep" in out  # the group column (rich may wrap the point text)


def test_table_of_a_sweep_has_a_row_per_grid_point_with_seed_mean(engine) -> None:  # type: ignore[no-untyped-def]
    """`table --sweep N`: one row per resolution, each the mean of its two seeds (noop: always right)."""
    code, out = _invoke(*SWEEP)
    sweep_id = json.loads(out)["sweep_id"]
    code, out = _invoke("table", "--sweep", str(sweep_id), "--json")
    assert code == 0, out
    table = json.loads(out)
    assert [r["label"] for r in table["rows"]] == ["noop resolution=224", "noop resolution=256"]
    cell = table["rows"][0]["cells"]["toy"]
    assert cell["value"] == 1.0 and cell["std"] == 0.0 and cell["seeds"] == [0, 1] and len(cell["runs"]) == 2
    code, out = _invoke("table", "--format", "markdown")
    assert code == 0 and out.startswith("| method | toy (n=12) |")


def test_sweep_rows_follow_the_grid_as_submitted(engine) -> None:  # type: ignore[no-untyped-def]
    """Rows in the order the grid was typed (232 before 224), not as strings sort; the baseline of a sweep
    table is its first grid point."""
    code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "noop", "--sweep", "resolution=232,224",
                        "--json")
    assert code == 0, out
    code, out = _invoke("table", "--sweep", str(json.loads(out)["sweep_id"]), "--baseline", "noop", "--json")
    assert code == 0, out
    table = json.loads(out)
    assert [r["label"] for r in table["rows"]] == ["noop resolution=232", "noop resolution=224"]
    assert table["baseline_row"] == "noop resolution=232"


def test_bad_sweeps_write_nothing(engine) -> None:  # type: ignore[no-untyped-def]
    """A bad value anywhere in the grid, a malformed --sweep or --seeds: exit 2, one line, no run, no sweep."""
    for args, argument in ((("--sweep", "resolution=224,8"), "--sweep resolution=8"), (("--sweep", "steps"), "--sweep"),
                           (("--sweep", "resolution=224,abc"), "--sweep resolution=abc"),
                           (("--seeds", "0,x"), "--seeds"), (("--sweep", "nonsense=1,2"), "--sweep=nonsense")):
        code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "noop", *args)
        assert code == 2 and argument in out and len(out.strip().splitlines()) == 1, out
    assert (_count(engine, Run), _count(engine, Sweep)) == (0, 0)


def test_more_than_200_runs_needs_yes(engine) -> None:  # type: ignore[no-untyped-def]
    """15 x 14 = 210 runs is refused without --yes, before anything is written."""
    values = ",".join(str(224 + 8 * i) for i in range(15))
    code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "noop", "--sweep", f"resolution={values}",
                        "--seeds", ",".join(map(str, range(14))))
    assert code == 2 and "--yes" in out and "210 runs" in out
    assert (_count(engine, Run), _count(engine, Sweep)) == (0, 0)


@pytest.mark.unit
def test_grid_parsing() -> None:
    """Keys keep their order, duplicate values collapse, seeds multiply the grid."""
    grid = parse_sweep(["steps=1,2,2", "selection_p=0.05,0.1"])
    assert grid == {"steps": ["1", "2"], "selection_p": ["0.05", "0.1"]}
    points = grid_points(grid, parse_seeds("0,1"))
    assert len(points) == 8 and points[0] == {"steps": "1", "selection_p": "0.05", "seed": 0}


@pytest.mark.unit
def test_seeds_of_a_configuration_that_draws_nothing_at_random_are_refused(engine) -> None:  # type: ignore[no-untyped-def]
    """Zero-shot (one view, a fixed prompt) or TDA with one view: every seed would be the same run, and `table`
    would show a spread of 0 over "seeds". Refused before anything is written; random views make seeds count."""
    code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "zeroshot", "--seeds", "0,1")
    assert code == 2 and "--seeds=0,1" in out and "draws nothing at random" in out, out
    assert (_count(engine, Run), _count(engine, Sweep)) == (0, 0)
    from difftpt_ops.services.running.sweeps import _check_seeds_matter

    with pytest.raises(InputError, match="tda draws nothing at random.*--orders K"):
        _check_seeds_matter("tda", {}, grid_points({}, [0, 1]), [0, 1], "imagefolder")
    with pytest.raises(InputError, match="n_views=1 draws nothing"):
        _check_seeds_matter("tpt", {}, grid_points({"n_views": ["1", "8"]}, [0, 1]), [0, 1], "imagefolder")
    for method, overrides, fmt in (("tpt", {}, "imagefolder"), ("tda", {}, "imagenet-a"), ("dmn-zs", {}, "dtd"),
                                   ("tda", {"n_views": "4"}, "imagefolder"), ("zeroshot", {}, "imagefolder")):
        seeds = [0, 1] if method != "zeroshot" else [3]  # one seed is always fine
        _check_seeds_matter(method, overrides, grid_points({}, seeds), seeds, fmt)


@pytest.mark.parametrize(("grid", "argument"), [
    ({"steps": ["1", "-1"]}, "--sweep steps"),
    ({"prompt.ctx_init": ["a photo of a", "a"]}, "--sweep prompt.ctx_init"),  # a prompt field, as typed
])
def test_a_bad_grid_value_names_its_sweep_key(grid: dict[str, list[str]], argument: str) -> None:
    with pytest.raises(InputError) as info:
        _check_plan("tpt", {}, grid, grid_points(grid, [0]), True)
    assert info.value.argument == argument, str(info.value)


def test_table_bad_options_are_one_line_errors(engine) -> None:  # type: ignore[no-untyped-def]
    """Unknown format, malformed or unknown run ids, an unknown sweep: exit 2 and one line naming the option."""
    _invoke("submit", "tune", "--dataset", "toy", "--method", "noop", "--json")
    for args, argument in ((("--format", "html"), "--format"), (("--runs", "1,x"), "--runs"),
                           (("--runs", "99"), "--runs"), (("--sweep", "7"), "--sweep"),
                           (("--metric", "top3"), "--metric"), (("--methods", "noop,"), "--methods")):
        code, out = _invoke("table", *args)
        assert code == 2 and argument in out and len(out.strip().splitlines()) == 1, (args, out)


def test_compare_reports_sweep_and_seed_groups(engine) -> None:  # type: ignore[no-untyped-def]
    """compare: each side's sweep and grid point, and top-1 over the runs repeating it with other seeds."""
    code, out = _invoke(*SWEEP)
    points = {(p["point"]["resolution"], p["point"]["seed"]): p["run_id"] for p in json.loads(out)["points"]}
    a, b = points[("224", 0)], points[("256", 0)]
    code, out = _invoke("compare", str(a), str(b), "--json")
    assert code == 0, out
    payload = json.loads(out)
    groups = payload["groups_a"]
    assert groups["sweeps"] == [{"sweep_id": 1, "point": {"resolution": "224", "seed": 0}}]
    assert groups["seeds"]["runs"] == sorted([a, points[("224", 1)]]) and groups["seeds"]["seeds"] == [0, 1]
    assert groups["seeds"]["top1_mean"] == 1.0 and groups["seeds"]["top1_std"] == 0.0  # noop is always right
    code, out = _invoke("compare", str(a), str(b))
    assert code == 0 and f"A={a}: in sweep 1 at resolution=224 seed=0" in out


def test_a_point_its_own_submit_refuses_writes_no_sweep(engine, tiny_models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """QA: `--sweep n_generated=2,32` with 16 images per sample recorded the sweep and ran the n_generated=2 point
    before the 32 one was refused (naming `n_generated=32`, not the --sweep typed): every point's spec is resolved
    as its submit would (generation config, images per sample) before the sweep is recorded."""
    from difftpt_ops.core.specs import GenerationSpec
    from difftpt_ops.services.running.generation import get_or_create_generation_config

    with session_scope(engine) as session:
        config_id = get_or_create_generation_config(session, GenerationSpec(model="tiny", per_sample=4)).id
    for values in ("8,2", "2,8"):
        code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "difftpt", "--model",
                            str(tiny_models_dir / "clip"), "--pretrained", "none", "--device", "cpu", "--generation",
                            str(config_id), "--sweep", f"n_generated={values}", "--limit", "1")
        assert code == 2, out
        assert out.strip().splitlines() == [
            f"error: --sweep n_generated=8: exceeds the 4 images per sample of generation config {config_id}; pass "
            f"--set n_generated=4 or generate more with `difftpt-ops submit generate --dataset toy --per-sample 8`"]
    assert (_count(engine, Run), _count(engine, Sweep), _count(engine, SweepRun)) == (0, 0, 0)


def test_an_embedded_sweep_whose_images_are_missing_writes_no_sweep(engine, tiny_models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """An embedded DiffTPT sweep over a generation config whose images were never generated: every point would be
    refused at its submit (the run executes now), so the sweep is refused before it is recorded (it was recorded,
    with no run, and the error came from its first point)."""
    from difftpt_ops.core.specs import GenerationSpec
    from difftpt_ops.services.running.generation import get_or_create_generation_config

    with session_scope(engine) as session:
        config_id = get_or_create_generation_config(session, GenerationSpec(model="tiny", per_sample=4)).id
    code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "difftpt", "--model",
                        str(tiny_models_dir / "clip"), "--pretrained", "none", "--device", "cpu", "--generation",
                        str(config_id), "--sweep", "n_generated=2,4", "--limit", "1")
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --generation={config_id}: 1 of 1 samples do not have"), out
    assert (_count(engine, Run), _count(engine, Sweep), _count(engine, SweepRun)) == (0, 0, 0)


def test_more_than_200_seeds_without_a_grid_name_seeds(engine) -> None:  # type: ignore[no-untyped-def]
    """QA: `--seeds 0,...,249` alone asked for --yes in a message naming `--sweep=250 runs` (no --sweep typed)."""
    code, out = _invoke("submit", "tune", "--dataset", "toy", "--method", "noop", "--seeds",
                        ",".join(map(str, range(250))))
    assert code == 2, out
    assert out.strip().splitlines() == ["error: --seeds=250 seeds: more than 200 runs; pass --yes to submit them"]
    assert (_count(engine, Run), _count(engine, Sweep)) == (0, 0)
