"""`difftpt-ops data ...` through the CLI on SQLite and PostgreSQL: output, exit codes, nothing written on errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select
from typer.testing import CliRunner

from cli.main import app
from difftpt_ops.db.session import get_engine, session_scope
from difftpt_ops.db.tables import Dataset, DatasetVersion, Sample

pytestmark = pytest.mark.integration
runner = CliRunner()


def make_imagefolder(root: Path, per_class: int = 3) -> Path:
    """Two classes of small JPEGs and PNGs, and one corrupt file."""
    for c, name in enumerate(("bird", "fish")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (9, 7), (c * 90, i * 30, 5)).save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "fish" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated garbage")
    return root


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def counts(database_url: str) -> tuple[int, int, int]:
    with session_scope(get_engine(database_url)) as session:
        return tuple(session.scalar(select(func.count()).select_from(t)) or 0  # type: ignore[return-value]
                     for t in (Dataset, DatasetVersion, Sample))


def assert_one_line_error(result, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_upgrade_add_show_list(cli_env: dict[str, str], database_url: str, tmp_path: Path) -> None:
    """The issue's check: db upgrade, data add with one corrupt file (exit 0, counts), data show, data list."""
    assert invoke("db", "upgrade").exit_code == 0
    root = make_imagefolder(tmp_path / "birds-fish")
    result = invoke("data", "add", "bf", "--root", str(root))
    assert result.exit_code == 0, result.output
    assert "ok=6 failed=1" in result.stdout and "fish/corrupt.jpg" in result.stdout
    shown = json.loads(invoke("data", "show", "bf", "--json").stdout)
    assert shown["class_names"] == ["bird", "fish"] and shown["version"]["num_failed"] == 1
    assert shown["per_class"][1] == {"label": 1, "name": "fish", "ok": 3, "failed": 1}
    assert shown["failed_samples"][0]["relpath"] == "fish/corrupt.jpg"
    assert "cannot decode image" in shown["failed_samples"][0]["error"]
    text = invoke("data", "show", "bf")
    assert text.exit_code == 0 and "failed samples" in text.stdout
    listed = invoke("data", "list")
    assert listed.exit_code == 0 and "bf" in listed.stdout and "imagefolder" in listed.stdout
    assert [d["name"] for d in json.loads(invoke("data", "list", "--json").stdout)] == ["bf"]
    again = invoke("data", "add", "bf", "--root", str(root), "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "already registered"
    assert counts(database_url) == (1, 1, 7)
    # --subset N --seed S adds version 2, which NAME@2 shows; --seed alone is a usage error.
    subset = invoke("data", "add", "bf", "--root", str(root), "--subset", "4", "--seed", "3", "--json")
    assert subset.exit_code == 0 and json.loads(subset.stdout)["subset"]["version"] == 2
    shown = json.loads(invoke("data", "show", "bf@2", "--json").stdout)
    assert shown["version"]["num_samples"] == 4 and shown["version"]["subset_seed"] == 3
    assert_one_line_error(invoke("data", "add", "bf", "--root", str(root), "--seed", "3"), "--seed=3")
    assert counts(database_url) == (1, 2, 11)


def test_bad_input_exits_2_with_one_line_and_writes_nothing(cli_env: dict[str, str], database_url: str,
                                                            tmp_path: Path) -> None:
    """Missing root, unknown format, wrong class-name count, a taken name, bad import options: exit 2, one line."""
    assert invoke("db", "upgrade").exit_code == 0
    root = make_imagefolder(tmp_path / "bf")
    names = tmp_path / "names.txt"
    names.write_text("only one name\n")
    missing = tmp_path / "missing"
    assert_one_line_error(invoke("data", "add", "x", "--root", str(missing)), "--root", str(missing))
    assert_one_line_error(invoke("data", "add", "x", "--root", str(root), "--format", "jpegs"),
                          "--format=jpegs", "unknown format")
    assert_one_line_error(invoke("data", "add", "x", "--root", str(root), "--class-names", str(names)),
                          "--class-names", str(names), "1 names")
    assert_one_line_error(invoke("data", "add", "x", "--root", str(root), "--subset", "0"), "--subset=0")
    assert counts(database_url) == (0, 0, 0)
    assert invoke("data", "add", "x", "--root", str(root)).exit_code == 0
    Image.new("RGB", (9, 7), (1, 2, 3)).save(root / "bird" / "0.png")
    assert_one_line_error(invoke("data", "add", "x", "--root", str(root)), "NAME=x", "other content")
    assert counts(database_url) == (1, 1, 7)
    assert_one_line_error(invoke("data", "show", "nope"), "DATASET=nope", "difftpt-ops data list")
    generated = tmp_path / "generated"
    generated.mkdir()
    assert_one_line_error(invoke("data", "import-generated", "--dataset", "nope", "--root", str(generated)),
                          "--dataset=nope")
    assert_one_line_error(invoke("data", "import-generated", "--dataset", "x", "--root", str(generated),
                                 "--steps", "0"), "--steps=0")
    assert_one_line_error(invoke("data", "import-generated", "--dataset", "x", "--root", str(tmp_path / "no")),
                          "--root")


def test_data_verify_names_changed_and_missing_files_and_exits_1(cli_env: dict[str, str], database_url: str,
                                                                   tmp_path: Path) -> None:
    """`data verify` hashes the readable samples again: exit 0 while they are unchanged, exit 1 and the files named
    once one changed or went missing (the corrupt file registered as failed is not checked); a bad name exits 2."""
    assert invoke("db", "upgrade").exit_code == 0
    root = make_imagefolder(tmp_path / "bf")
    assert invoke("data", "add", "bf", "--root", str(root), "--subset", "4", "--seed", "0").exit_code == 0
    intact = invoke("data", "verify", "bf@1")
    assert intact.exit_code == 0, intact.output
    assert "6 files checked, 6 unchanged, 0 changed, 0 missing, 0 unreadable" in intact.stdout
    Image.new("RGB", (9, 7), (1, 2, 3)).save(root / "bird" / "0.png")
    (root / "fish" / "1.jpg").unlink()
    text = invoke("data", "verify", "bf@1")
    assert text.exit_code == 1, text.output
    assert "4 unchanged, 1 changed, 1 missing" in text.stdout
    assert "bird/0.png" in text.stdout and "fish/1.jpg" in text.stdout
    report = json.loads(invoke("data", "verify", "bf@1", "--json").stdout)
    assert sorted((p["relpath"], p["problem"]) for p in report["problems"]) == [
        ("bird/0.png", "changed"), ("fish/1.jpg", "missing")]
    assert json.loads(invoke("data", "verify", "bf", "--json").stdout)["checked"] == 4  # NAME: the latest version
    assert_one_line_error(invoke("data", "verify", "nope"), "DATASET=nope")
    assert_one_line_error(invoke("data", "verify", "bf@x"), "DATASET=bf@x")
    assert counts(database_url) == (1, 2, 11)  # verifying writes nothing


def test_data_commands_do_not_import_torch(workspace: Path) -> None:
    """`data list` stays fast: no torch, diffusers or mlflow behind it."""
    code = ("import sys; from typer.testing import CliRunner; from cli.main import app; "
            "r = CliRunner().invoke(app, ['data', 'list', '--json']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'diffusers', 'open_clip', 'mlflow', 'celery') if m in sys.modules))")
    env = {**os.environ, "DIFFTPT_OPS_WORKSPACE": str(workspace)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
