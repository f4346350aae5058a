"""The CLI in scripts and logs, through subprocesses as a user's shell runs it (stdout and stderr are pipes).

One embedded SQLite workspace per module: the photos the demo uses, registered once, tiny models.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from difftpt_ops.data.demo_photos import write_demo_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATASET = "photos-with-a-rather-long-dataset-name-for-width"


def _env(workspace: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_") and k != "COLUMNS"}
    env.update({"DIFFTPT_OPS_WORKSPACE": str(workspace), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return env


def cli(workspace: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=_env(workspace), capture_output=True,
                          text=True, timeout=timeout, check=False)


def ok(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = cli(workspace, *args)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Path:
    """A workspace with the photos registered and one finished zero-shot run (run 1)."""
    root = tmp_path_factory.mktemp("conventions")
    write_demo_dataset(root / "photos")
    workspace = root / "ws"
    ok(workspace, "data", "add", DATASET, "--root", str(root / "photos"), "--format", "imagefolder")
    ok(workspace, "submit", "tune", "--dataset", DATASET, "--method", "zeroshot", "--model",
       str(tiny_models_dir / "clip"), "--pretrained", "none", "--device", "cpu")
    return workspace


def _row_counts(workspace: Path) -> dict[str, int]:
    with sqlite3.connect(workspace / "difftpt.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}


def _files(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_tables_are_whole_in_pipes_and_plain_with_format(ws: Path) -> None:
    """Piped tables keep every character; --format tsv and csv print a header and one line per row."""
    table = ok(ws, "runs", "list").stdout
    assert DATASET + "@1" in table and "…" not in table
    header, *lines = [line.split("\t") for line in ok(ws, "runs", "list", "--format", "tsv").stdout.splitlines()]
    first = dict(zip(header, lines[-1], strict=True))  # newest first: run 1 is last
    assert {k: first[k] for k in ("run", "kind", "method", "dataset", "state")} == {
        "run": "1", "kind": "tune", "method": "zeroshot", "dataset": f"{DATASET}@1", "state": "finished"}
    rows = list(csv.DictReader(io.StringIO(ok(ws, "runs", "list", "--format", "csv").stdout)))
    assert rows[-1]["dataset"] == f"{DATASET}@1" and rows[-1]["run"] == "1"
    bad = cli(ws, "runs", "list", "--format", "xlsx")
    assert bad.returncode == 2 and "--format" in bad.stderr


def test_progress_lines_when_piped_and_none_with_quiet(ws: Path, tiny_models_dir: Path) -> None:
    """An embedded submit off a terminal prints plain progress lines on stderr; --quiet prints none."""
    args = ("submit", "tune", "--dataset", DATASET, "--method", "zeroshot", "--model", str(tiny_models_dir / "clip"),
            "--pretrained", "none", "--device", "cpu")
    loud = ok(ws, *args, "--seed", "1")
    lines = [line for line in loud.stderr.splitlines() if line.startswith("run ")]
    assert lines[0] == "run 2: 0/27 samples, - samples/s, ETA ?"
    assert lines[-1].startswith("run 2: 27/27 samples, ") and "samples/s, ETA" in lines[-1]
    assert "\x1b[" not in loud.stderr  # no terminal control codes in a log
    quiet = ok(ws, *args, "--seed", "2", "--quiet")
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("run ")]
    assert "created run 3" in quiet.stdout  # the result itself is still printed
    both = cli(ws, "runs", "list", "--quiet", "--verbose")
    assert both.returncode == 2 and both.stderr.startswith("error: --quiet=True")


def test_status_shows_active_runs_and_watch_json_is_json_lines(ws: Path) -> None:
    """No RUN: only active runs (none here); --watch --json: one JSON object per run per line."""
    assert json.loads(ok(ws, "status", "--json").stdout) == []
    assert "no active runs" in ok(ws, "status").stderr
    one = json.loads(ok(ws, "status", "1", "--json").stdout)
    assert one[0]["run_id"] == 1 and (one[0]["disk"]["images"], one[0]["disk"]["image_bytes"]) == (0, 0)
    plain = ok(ws, "status", "1", "--watch").stdout.splitlines()  # off a terminal: plain lines, no redraws
    assert plain and plain[-1].startswith("run 1  kind tune/zeroshot") and "state finished" in plain[-1]
    lines = ok(ws, "status", "1", "--watch", "--json").stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert objects and all(o["run_id"] == 1 and o["state"] == "finished" and "observed_at" in o for o in objects)
    [row] = list(csv.DictReader(io.StringIO(ok(ws, "status", "1", "--format", "csv").stdout)))
    features = one[0]["disk"]["features"]
    assert (row["run"], row["method"], row["done"], row["image_bytes"], row["features"]) == (
        "1", "zeroshot", "27", "0", str(features))  # numbers as stored, one value per column
    assert row["throughput"] == "" or float(row["throughput"]) > 0


def test_set_with_an_unknown_field_lists_the_valid_ones(ws: Path) -> None:
    done = cli(ws, "submit", "tune", "--dataset", DATASET, "--method", "tpt", "--set", "stepz=2")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--set=stepz" in done.stderr and "valid: " in done.stderr and "steps" in done.stderr


def test_usage_errors_are_one_line_too(ws: Path) -> None:
    """click's own errors (a value outside a choice, an unknown option, a missing argument): exit 2, one line
    naming what was wrong and where help is, nothing on stdout."""
    for args, says in ((("results", "1", "--format", "xml"), "'--format'"), (("results", "1", "--bogus"), "--bogus"),
                       (("results",), "'RUN'"), (("nosuchcmd",), "nosuchcmd")):
        done = cli(ws, *args)
        assert done.returncode == 2 and done.stdout == "", args
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("error: ") and says in line and "--help`)" in line, line


def test_dry_runs_write_nothing_and_measure_what_they_can(ws: Path, tiny_models_dir: Path) -> None:
    """--dry-run: counts, disk and time from this workspace's own runs, and no row or file written."""
    generator = str(tiny_models_dir / "sd-image-variations")
    gen_args = ("submit", "generate", "--dataset", DATASET, "--model", generator, "--revision", "none",
                "--steps", "2", "--size", "32", "--device", "cpu", "--limit", "4")
    before, files = _row_counts(ws), _files(ws / "artifacts")
    first = json.loads(ok(ws, *gen_args, "--per-sample", "2", "--dry-run", "--json").stdout)
    assert (first["dry_run"], first["samples"], first["images_to_generate"], first["existing_run_id"]) == (
        True, 4, 8, None)
    assert first["seconds"] is None and first["time_source"].startswith("none yet")
    assert first["bytes_source"].startswith("estimate")
    tune = json.loads(ok(ws, "submit", "tune", "--dataset", DATASET, "--method", "tpt", "--dry-run",
                         "--json").stdout)
    assert (tune["samples"], tune["samples_to_do"], tune["shards_new"]) == (27, 27, 1)
    # DiffTPT before any generation: an estimate (no run can exist yet), not the error a submit gives.
    diff = json.loads(ok(ws, "submit", "tune", "--dataset", DATASET, "--method", "difftpt", "--dry-run",
                         "--json").stdout)
    assert (diff["samples_to_do"], diff["existing_run_id"]) == (27, None)
    assert diff["bytes_source"].startswith("no generation for")
    text = ok(ws, "submit", "tune", "--dataset", DATASET, "--method", "difftpt", "--dry-run").stdout
    assert f"  images:   no generation for {DATASET} yet: `difftpt-ops submit generate" in text  # not only JSON
    bad = cli(ws, "submit", "tune", "--dataset", DATASET, "--method", "tpt", "--dry-run", "--device", "gpu0")
    assert bad.returncode == 2 and "--device" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert _row_counts(ws) == before and _files(ws / "artifacts") == files

    real = ok(ws, *gen_args, "--per-sample", "2").stdout  # real: 8 images
    generation_run = _latest_run(ws)
    assert real.splitlines()[0] == (f"created run {generation_run} (generate on {DATASET}@1, 4 samples, 1 shards, "
                                    "1 new)")
    again = json.loads(ok(ws, *gen_args, "--per-sample", "3", "--dry-run", "--json").stdout)
    assert again["images_to_generate"] == 4 * 3  # another config: its own images
    assert again["bytes_source"].startswith("measured on 8 stored image(s) of 32 px images")
    sizes = [p.stat().st_size for p in (ws / "artifacts" / "generated").rglob("*.png")]
    assert again["bytes_per_image"] == round(sum(sizes) / len(sizes))
    assert again["disk_bytes"] == 12 * again["bytes_per_image"]
    assert again["seconds_per_unit"] > 0 and again["time_source"].startswith("measured: 8 image(s)")
    same = ok(ws, *gen_args, "--per-sample", "2", "--dry-run").stdout
    assert "attaches to run" in same and "0 to generate" in same
    assert same.splitlines()[0] == (f"dry run: generate on {DATASET}@1 attaches to run {generation_run}; "
                                    "nothing was written")
    status = json.loads(ok(ws, "status", str(_latest_run(ws)), "--json").stdout)[0]
    assert (status["disk"]["images"], status["disk"]["image_bytes"]) == (8, sum(sizes))


def _latest_run(workspace: Path) -> int:
    with sqlite3.connect(workspace / "difftpt.db") as db:
        return int(db.execute("SELECT MAX(id) FROM runs").fetchone()[0])


def test_models_check_loads_local_weights_and_explains_missing_ones(ws: Path, tiny_models_dir: Path,
                                                                     tmp_path: Path) -> None:
    """A local open_clip folder and a diffusers folder load offline with hashes; missing weights say how to get them."""
    import hashlib

    clip_dir, generator = tiny_models_dir / "clip", tiny_models_dir / "sd-image-variations"
    reports = json.loads(ok(ws, "models", "check", "--model", str(clip_dir), "--generator", str(generator),
                            "--json").stdout)
    clip, gen = reports
    weights = clip_dir / "open_clip_model.safetensors"
    assert clip["files"] == [{"path": str(weights), "bytes": weights.stat().st_size,
                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}]
    assert clip["parameters"] > 1_000_000 and clip["precision"] == "fp32"
    assert clip["activation"] in {"gelu", "quickgelu"}
    assert gen["pipeline"] == "StableDiffusionImageVariationPipeline" and len(gen["files"]) == 3
    missing = cli(ws, "models", "check", "--model", "ViT-B-16", "--pretrained", "openai")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "--pretrained=openai" in missing.stderr and "make-tiny" not in missing.stderr
    assert "--pretrained /path/ViT-B-16.pt" in missing.stderr
    nowhere = cli(ws, "models", "check", "--model", str(clip_dir), "--generator", "/nonexistent/sd")
    assert nowhere.returncode == 2 and "--generator=/nonexistent/sd" in nowhere.stderr
    not_a_pipeline = tmp_path / "not-a-pipeline"
    not_a_pipeline.mkdir()
    wrong = cli(ws, "models", "check", "--model", str(clip_dir), "--pretrained", "none", "--generator",
                str(not_a_pipeline))
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        f"error: --generator={not_a_pipeline}: is a directory but not a diffusers pipeline (no model_index.json)"]


def test_quiet_by_default_and_completion(ws: Path, tmp_path: Path) -> None:
    """make-tiny prints no library bars; an MLflow store is created without INFO lines; completion is on."""
    made = ok(ws, "models", "make-tiny", str(tmp_path / "tiny"))
    assert "Writing model shards" not in made.stderr and "%|" not in made.stderr
    fresh = tmp_path / "fresh"
    ok(fresh, "data", "add", "few", "--root", str(_few_photos(tmp_path)), "--format", "imagefolder")
    run = ok(fresh, "submit", "tune", "--dataset", "few", "--method", "zeroshot", "--model",
             str(tmp_path / "tiny" / "clip"), "--pretrained", "none", "--device", "cpu")
    assert "mlflow" not in run.stderr.lower() and "Creating initial" not in run.stderr
    assert (fresh / "mlflow.db").exists()  # tracking did run
    entry_point = Path(sys.executable).parent / "difftpt-ops"  # completion is keyed by the program's name
    # Typer detects the shell from the process tree, which a detached process (a CI job, `nohup`) may lack; with
    # detection off, --show-completion takes the shell as its value.
    named_shell = {**_env(ws), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    completion = subprocess.run([str(entry_point), "--show-completion", "bash"], env=named_shell,
                                capture_output=True, text=True, timeout=120, check=False)
    assert completion.returncode == 0, (completion.stdout, completion.stderr)
    assert "_difftpt_ops_completion" in completion.stdout and "complete -o default" in completion.stdout


def _few_photos(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "few"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 100 if label == "a" else 0, 0)).save(root / label / f"{i}.png")
    return root


def test_results_print_accuracy_in_percent_as_the_demo_does(ws: Path) -> None:
    """`results` text shows top-1 as the demo's table does (percent, one decimal); --json, --csv and --format
    tsv / csv, which scripts read, keep the fraction."""
    from cli.demo import _pct

    top1 = json.loads(ok(ws, "results", "1", "--json").stdout)["top1"]
    table = ok(ws, "results", "1").stdout
    assert re.search(rf"top1\s*│\s*{re.escape(_pct(top1))}", table) and _pct(top1) == f"{100 * top1:.1f}%"
    rows = dict(line.split("\t", 1) for line in ok(ws, "results", "1", "--format", "tsv").stdout.splitlines())
    assert float(rows["top1"]) == top1
    keyed = dict(csv.reader(io.StringIO(ok(ws, "results", "1", "--format", "csv").stdout)))
    wide = next(csv.DictReader(io.StringIO(ok(ws, "results", "1", "--csv").stdout)))
    assert float(keyed["top1"]) == float(wide["top1"]) == top1
    assert keyed["top1_ci95_low"] == wide["top1_ci95_low"] and "top1_ci95" not in keyed
    per_class = list(csv.DictReader(io.StringIO(ok(ws, "results", "1", "--by-class", "--format", "csv").stdout)))
    assert per_class and set(per_class[0]) == {"label", "name", "n", "correct", "top1", "zeroshot_top1", "gain"}
    paired = dict(csv.reader(io.StringIO(ok(ws, "compare", "1", "1", "--format", "csv").stdout)))
    assert paired["key"] == "value" and float(paired["top1_a"]) == top1 and "difference_ci95_low" in paired


def test_another_name_for_the_same_samples_says_whose_runs_it_gets(ws: Path, tmp_path: Path,
                                                                    tiny_models_dir: Path) -> None:
    """Registering the photos again under another name and submitting the same spec attaches to run 1 (a run's
    identity is its samples' content), and says so: the run's dataset, and that the two names share samples."""
    photos = tmp_path / "photos"
    write_demo_dataset(photos)
    ok(ws, "data", "add", "again", "--root", str(photos), "--format", "imagefolder")
    out = ok(ws, "submit", "tune", "--dataset", "again", "--method", "zeroshot", "--model",
             str(tiny_models_dir / "clip"), "--pretrained", "none", "--device", "cpu").stdout.splitlines()
    assert out[0].startswith(f"attached to run 1 (tune zeroshot on {DATASET}@1, ")
    assert out[1] == f"again holds the same samples as {DATASET}@1: its runs are {DATASET}@1's (runs list and " \
                     "table show them under that name)"
