"""`submit tune --orders K` combined with another order seed: the one-line error names what the user typed."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from difftpt_ops.db.tables import Run
from tests.integration.test_online_support import cli_workspace

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize(("extra", "named"), [
    (["--order-seed", "3"], "--order-seed=3"),
    (["--set", "order_seed=5"], "--set order_seed=5"),
    (["--sweep", "order_seed=1,2"], "--sweep order_seed=1,2"),
])
def test_orders_with_another_order_seed_names_what_was_typed(workspace: Path, tmp_path: Path, tiny_models_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch, extra: list[str],
                                                            named: str) -> None:
    """QA: `--orders 2 --order-seed 3` said "--sweep=order_seed: is also given with --set" (neither was typed), and
    `--orders 2 --sweep order_seed=1,2` said "--sweep=order_seed=0,1: ... swept twice" (0,1 was not typed)."""
    from cli.main import app

    _, engine = cli_workspace(workspace, tmp_path / "images", monkeypatch)
    result = CliRunner().invoke(app, ["submit", "tune", "--dataset", "pics", "--method", "oga", "--model",
                                      str(tiny_models_dir / "clip"), "--pretrained", "none", "--orders", "2", *extra])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "--orders=2" in lines[0] and named in lines[0], result.output
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Run)) == 0  # nothing written
    engine.dispose()


@pytest.mark.parametrize(("extra", "runs"), [([], 250), (["--sweep", "tau=0.05,0.1"], 500)])
def test_many_orders_ask_for_yes_naming_orders(workspace: Path, tmp_path: Path, tiny_models_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch, extra: list[str], runs: int) -> None:
    """QA: `--orders 250` asked for --yes in a message naming `--sweep=250 runs` (nobody typed --sweep). It names
    --orders and the runs it makes, and writes nothing (no run, no sweep)."""
    from cli.main import app
    from difftpt_ops.db.tables import Sweep

    _, engine = cli_workspace(workspace, tmp_path / "images", monkeypatch)
    result = CliRunner().invoke(app, ["submit", "tune", "--dataset", "pics", "--method", "oga", "--model",
                                      str(tiny_models_dir / "clip"), "--pretrained", "none", "--orders", "250", *extra])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: --orders=250: ") and f"{runs} runs" in lines[0], lines
    assert "--yes" in lines[0] and "--sweep" not in lines[0], lines
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Run)) == 0
        assert connection.scalar(select(func.count()).select_from(Sweep)) == 0
    engine.dispose()


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_a_negative_order_seed_is_named_as_typed(workspace: Path, tmp_path: Path, tiny_models_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch, extra: list[str]) -> None:
    """QA: `--order-seed -1` said `--set order_seed=-1: must be >= 0` (nobody typed --set)."""
    from cli.main import app

    _, engine = cli_workspace(workspace, tmp_path / "images", monkeypatch)
    result = CliRunner().invoke(app, ["submit", "tune", "--dataset", "pics", "--method", "ecalp", "--model",
                                      str(tiny_models_dir / "clip"), "--pretrained", "none", "--order-seed", "-1",
                                      *extra])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --order-seed=-1: must be >= 0", result.output
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Run)) == 0
    engine.dispose()
