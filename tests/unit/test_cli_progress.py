"""Plain progress lines for logs and pipes: at start, at a steady interval, and at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.common import PlainProgress

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_at_start_every_interval_and_at_the_end() -> None:
    """A line at start, one per interval however many samples finish in it, and a final one."""
    lines: list[str] = []
    clock = Clock()
    sink = PlainProgress(lines.append, interval_s=10.0, clock=clock, ticker=False)
    sink.start(7, total=100, completed=0)
    for _ in range(45):  # 45 samples, one per second
        clock.now += 1.0
        sink.advance(1, 0)
    sink.stop()
    assert lines[0] == "run 7: 0/100 samples, - samples/s, ETA ?"
    assert len(lines) == 1 + 4 + 1  # start, at 10/20/30/40 s, end
    assert lines[1] == "run 7: 10/100 samples, 1.00 samples/s, ETA 1m30s"
    assert lines[-1] == "run 7: 45/100 samples, 1.00 samples/s, ETA 0m55s"


def test_resumed_run_counts_rate_from_this_session_only() -> None:
    """Samples finished before this session do not inflate the rate."""
    lines: list[str] = []
    clock = Clock()
    sink = PlainProgress(lines.append, interval_s=5.0, clock=clock, ticker=False)
    sink.start(3, total=60, completed=50)
    clock.now += 10.0
    sink.advance(5, 0)
    sink.stop()
    assert lines[-1] == "run 3: 55/60 samples, 0.50 samples/s, ETA 0m10s"


def test_no_final_duplicate_when_nothing_changed() -> None:
    lines: list[str] = []
    sink = PlainProgress(lines.append, interval_s=5.0, clock=Clock(), ticker=False)
    sink.start(1, total=2, completed=2)
    sink.stop()
    assert lines == ["run 1: 2/2 samples, - samples/s, ETA ?"]


def test_lines_keep_coming_while_one_sample_takes_long() -> None:
    """With no sample finishing, the timer still prints a line per interval (a slow model load is visible)."""
    import time

    lines: list[str] = []
    sink = PlainProgress(lines.append, interval_s=0.2)
    sink.start(5, total=10, completed=0)
    time.sleep(0.9)
    sink.stop()
    assert 3 <= len(lines) <= 6  # start, then about one per 0.2 s (a loaded machine may skip one)
    assert all(line.startswith("run 5: 0/10 samples") for line in lines)


@pytest.mark.parametrize("ticker", [False, True])
def test_one_sink_serves_the_runs_of_a_sweep_in_turn(ticker: bool) -> None:
    """A sweep's runs share one sink, as the embedded executor uses it: each run is started, stop comes once
    at the end. Every run gets its start and final lines, and with the timer on a second start is not refused
    (a thread can be started only once)."""
    lines: list[str] = []
    clock = Clock()
    sink = PlainProgress(lines.append, interval_s=60.0, clock=clock, ticker=ticker)
    for run_id in (4, 5, 6):
        sink.start(run_id, total=3, completed=0)
        clock.now += 3.0
        sink.advance(3, 0)
    sink.stop()
    expected = []
    for run_id in (4, 5, 6):
        expected += [f"run {run_id}: 0/3 samples, - samples/s, ETA ?",
                     f"run {run_id}: 3/3 samples, 1.00 samples/s, ETA 0m00s"]
    assert lines == expected


def test_ctrl_c_names_the_run_it_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ctrl-C line names the run whose execution had started (from the progress sink, --json included),
    says nothing was started when none had, and never carries a run over to the next invocation."""
    from typer.testing import CliRunner

    import cli.jobs
    from cli.main import app
    from difftpt_ops.services.running import runs

    started: list[int] = []

    def interrupted_submit(*_args: object, progress: object, **_kwargs: object) -> None:
        for run_id in started:  # the executor starts the sink with the run it executes
            progress.start(run_id, 10, 0)  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "submit_tune", interrupted_submit)
    monkeypatch.setattr(cli.jobs, "engine_of", lambda _ctx: None)
    submit = ["-w", str(tmp_path / "ws"), "submit", "tune", "--dataset", "photos", "--method", "tpt"]
    runner = CliRunner()
    for run_ids, flags, line in (
            ([7], [], "interrupted; run 7's finished work is stored, `difftpt-ops resume 7` continues"),
            ([4, 5], ["--json"], "interrupted; run 5's finished work is stored, `difftpt-ops resume 5` continues"),
            ([], [], "interrupted before any run started; nothing to resume")):
        started[:] = run_ids
        out = runner.invoke(app, [*submit, *flags])
        assert out.exit_code == 130, out.output
        assert out.stderr.strip().splitlines()[-1] == line
        assert "RUN" not in out.stderr
