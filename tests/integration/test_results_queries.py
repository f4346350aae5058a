"""`results`, `compare`, `export` and the result views on SQLite and PostgreSQL, against direct counts."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scipy.stats import binomtest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from difftpt_ops.core.errors import InputError, NotFoundError
from difftpt_ops.db.session import get_engine, session_scope, upgrade
from difftpt_ops.services.reading import stats
from difftpt_ops.services.reading.results import compare_runs, export_run, run_results
from tests.conftest import scratch_database
from tests.factories import (
    make_dataset_version,
    make_predictions,
    make_run,
    make_sample_errors,
    make_shard,
    samples_of,
)

pytestmark = pytest.mark.integration


@dataclass
class Seeded:
    run_a: int
    run_b: int
    mask_a: list[bool]
    mask_b: list[bool]
    zeroshot: list[bool]
    confidences: list[float]
    labels: list[int]
    n_samples: int


@pytest.fixture
def engine(database_url: str) -> Engine:
    engine = get_engine(database_url)
    upgrade(engine)
    return engine


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Seeded]]:
    """One database per backend, seeded once for the tests that only read it."""
    with scratch_database(request.param, tmp_path_factory.mktemp("results-db")) as url:
        engine = get_engine(url)
        upgrade(engine)
        yield engine, seed(engine)


def seed(engine: Engine, n: int = 60, n_classes: int = 4, seed_value: int = 0) -> Seeded:
    """Run A finished n-4 samples (2 failed), run B finished n-2, on the same version."""
    rng = random.Random(seed_value)
    mask_a = [rng.random() < 0.7 for _ in range(n - 4)]
    mask_b = [rng.random() < 0.55 for _ in range(n - 2)]
    zeroshot = [rng.random() < 0.5 for _ in range(n - 4)]
    confidences = [round(rng.random(), 4) for _ in range(n - 4)]
    with session_scope(engine) as session:
        version = make_dataset_version(session, n, n_classes)
        a = make_run(session, version, method="tpt")
        b = make_run(session, version, method="zeroshot")
        make_predictions(session, a, mask_a, zeroshot_mask=zeroshot, confidences=confidences, seconds=0.25)
        make_predictions(session, b, mask_b)
        make_sample_errors(session, a, samples_of(session, version)[n - 4:n - 2])
        make_shard(session, a, seconds=1800.0, gpu="cuda:0")
        make_shard(session, a, index=1, seconds=999.0, gpu=None)
        labels = [s.label for s in samples_of(session, version)]
        return Seeded(a.id, b.id, mask_a, mask_b, zeroshot, confidences, labels, n)


def test_results_equal_direct_sql_counts(seeded: tuple[Engine, Seeded]) -> None:
    """Top-1, top-5, zero-shot, done/failed/pending, ECE and per-class agree with direct computations."""
    engine, data = seeded
    result = run_results(engine, data.run_a)
    with engine.connect() as conn:
        done, correct, top5 = conn.execute(text(
            "SELECT COUNT(*), SUM(CASE WHEN correct THEN 1 ELSE 0 END), SUM(CASE WHEN top5_correct THEN 1 ELSE 0 END)"
            " FROM predictions WHERE run_id = :r"), {"r": data.run_a}).one()
    assert (result["done"], result["failed"], result["pending"]) == (done, 2, data.n_samples - done - 2)
    assert result["top1"] == pytest.approx(correct / done)
    assert result["top5"] == pytest.approx(top5 / done)
    assert result["top1"] == pytest.approx(sum(data.mask_a) / len(data.mask_a))
    assert result["zeroshot_top1"] == pytest.approx(sum(data.zeroshot) / len(data.zeroshot))
    assert result["gain"] == pytest.approx(result["top1"] - result["zeroshot_top1"])
    assert result["mean_seconds"] == pytest.approx(0.25)
    assert result["top1_ci95"] == pytest.approx(list(stats.wilson_interval(correct, done)))
    _check_ece(engine, data)
    _check_by_class(engine, data)


def test_reading_builtin_runs_does_not_import_torch(seeded: tuple[Engine, Seeded]) -> None:
    """`results` and `compare` on zero-shot, TPT or DiffTPT runs stay light: importing torch (the method registry)
    cost every reading command seconds, 10 s a call on a GPU machine. Checked in a child interpreter."""
    engine, data = seeded
    child = (
        "import sys\n"
        "from difftpt_ops.db.session import get_engine\n"
        "from difftpt_ops.services.reading.results import compare_runs, run_results\n"
        f"engine = get_engine({engine.url.render_as_string(hide_password=False)!r})\n"
        f"run_results(engine, {data.run_a}); compare_runs(engine, {data.run_a}, {data.run_b})\n"
        "print(sorted(m for m in ('torch', 'difftpt_ops.tta') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def _check_ece(engine: Engine, data: Seeded) -> None:
    """The SQL binning gives the same ECE as binning the confidences in Python, over 15 bins by default and over
    the count asked for (C-TPT's code uses 20); the result says how many."""
    found = {}
    for n_bins in (15, 20, 1):
        bins: dict[int, list[tuple[float, bool]]] = {}
        for conf, right in zip(data.confidences, data.mask_a, strict=True):
            bins.setdefault(stats.confidence_bin(conf, n_bins), []).append((conf, right))
        expected = stats.expected_calibration_error(
            stats.CalibrationBin(i, len(v), sum(r for _, r in v), sum(c for c, _ in v)) for i, v in bins.items())
        result = run_results(engine, data.run_a, **({} if n_bins == 15 else {"ece_bins": n_bins}))
        assert (result["ece"], result["ece_bins"]) == (pytest.approx(expected), n_bins)
        found[n_bins] = result["ece"]
    assert len(set(found.values())) == 3  # the bin count is used, not ignored
    for bad in (0, stats.MAX_ECE_BINS + 1, True):
        with pytest.raises(InputError, match="--ece-bins"):
            run_results(engine, data.run_a, ece_bins=bad)


def _check_by_class(engine: Engine, data: Seeded) -> None:
    """Per class: n, accuracy, zero-shot accuracy and the class name."""
    classes = run_results(engine, data.run_a, by_class=True)["classes"]
    for row in classes:
        members = [i for i, label in enumerate(data.labels[:len(data.mask_a)]) if label == row["label"]]
        assert row["name"] == f"class{row['label']}"
        assert row["n"] == len(members)
        assert row["top1"] == pytest.approx(sum(data.mask_a[i] for i in members) / len(members))
        assert row["zeroshot_top1"] == pytest.approx(sum(data.zeroshot[i] for i in members) / len(members))
    assert sum(row["n"] for row in classes) == len(data.mask_a)


def test_compare_matches_a_direct_computation(seeded: tuple[Engine, Seeded]) -> None:
    """2x2 counts over the samples both finished, McNemar equal to scipy's binomial test; bad ids refused."""
    engine, data = seeded
    pairs = list(zip(data.mask_a, data.mask_b[:len(data.mask_a)], strict=True))
    only_a = sum(a and not b for a, b in pairs)
    only_b = sum(b and not a for a, b in pairs)
    result = compare_runs(engine, data.run_a, data.run_b)
    assert result["paired_samples"] == len(pairs)
    assert result["both_right"] == sum(a and b for a, b in pairs)
    assert (result["only_a"], result["only_b"]) == (only_a, only_b)
    assert result["both_wrong"] == sum(not a and not b for a, b in pairs)
    assert result["difference"] == pytest.approx((only_a - only_b) / len(pairs))
    assert result["mcnemar_p"] == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    low, high = result["difference_ci95"]
    assert low <= result["difference"] <= high
    _check_refusals(engine, data)


def _check_refusals(engine: Engine, data: Seeded) -> None:
    """Unknown ids name their argument; runs on another version of the dataset (a subset) are refused as such."""
    from difftpt_ops.db.tables import Dataset, DatasetVersion, Run

    with pytest.raises(NotFoundError, match="RUN=999"):
        run_results(engine, 999)
    with pytest.raises(NotFoundError, match="RUN_B=999"):
        compare_runs(engine, data.run_a, 999)
    with session_scope(engine) as session:
        version_a = session.get(DatasetVersion, session.get(Run, data.run_a).dataset_version_id)
        dataset = session.get(Dataset, version_a.dataset_id)
        subset = make_dataset_version(session, 5, dataset=dataset, version=version_a.version + 1)
        other = make_run(session, subset, method="tpt").id
        name, v_a, v_b = dataset.name, version_a.version, subset.version
    with pytest.raises(InputError) as info:
        compare_runs(engine, data.run_a, other)
    assert str(info.value) == (f"RUN_B={other}: is on {name}@{v_b} but RUN_A={data.run_a} is on {name}@{v_a}: "
                               "compare needs both runs on the same dataset version")


def test_export_round_trip(seeded: tuple[Engine, Seeded], tmp_path: Path) -> None:
    """Every finished sample, with its path and class names, in sample order, as Parquet and CSV."""
    import pandas as pd

    engine, data = seeded
    for fmt in ("parquet", "csv"):
        out = export_run(engine, data.run_a, tmp_path / f"run.{fmt}", fmt)
        frame = pd.read_parquet(out["path"]) if fmt == "parquet" else pd.read_csv(out["path"])
        assert out["rows"] == len(frame) == len(data.mask_a)
        assert list(frame["correct"].astype(bool)) == data.mask_a
        assert frame["label_name"].iloc[1] == f"class{data.labels[1]}"
        assert frame["relpath"].iloc[0] == "class0/img0.png"
    with pytest.raises(InputError, match="--format"):
        export_run(engine, data.run_a, tmp_path / "x", "xlsx")


def test_export_says_which_run_made_it(engine: Engine, tmp_path: Path) -> None:
    """A Parquet export (also MLflow's predictions.parquet) carries the run's identity and provenance in its
    metadata: run, method, model, seed, spec fingerprint and spec, the submitting machine's versions and the
    machines its shards ran on (weights included), so a file copied away still says what made it."""
    import pyarrow.parquet as pq

    provenance = {"difftpt_ops": "0.1.0", "git_commit": "abc123", "torch": "2.x"}
    machine = {"device": "cpu", "precision": "fp32", "activation": "gelu", "weights": "f" * 64}
    with session_scope(engine) as session:
        version = make_dataset_version(session, 3, 2)
        run = make_run(session, version, method="tpt", model_name="/weights/clip", pretrained=None, seed=2,
                       device="cpu", precision="fp32", settings="steps=2", provenance=provenance)
        make_predictions(session, run, [True, False, True])
        make_shard(session, run, provenance=machine)
        run_id, fingerprint, spec = run.id, run.fingerprint, run.spec
    out = export_run(engine, run_id, tmp_path / "run.parquet", "parquet")
    table = pq.read_table(out["path"])
    assert table.num_rows == 3
    meta = json.loads(table.schema.metadata[b"difftpt"])
    assert (meta["run_id"], meta["method"], meta["model"], meta["seed"], meta["fingerprint"]) == (
        run_id, "tpt", "/weights/clip", 2, fingerprint)
    assert meta["spec"] == spec and meta["provenance"] == provenance and meta["settings"] == "steps=2"
    assert meta["shard_provenance"] == [machine]
    # A CSV cannot carry metadata: the same facts go beside it, and a failed export leaves neither file.
    out = export_run(engine, run_id, tmp_path / "run.csv", "csv")
    sidecar = Path(out["provenance_path"])
    assert sidecar == tmp_path / "run.csv.provenance.json"
    assert json.loads(sidecar.read_text(encoding="utf-8"))["difftpt"] == meta
    assert not list(tmp_path.glob(".*partial"))


def test_views_agree_with_the_services(seeded: tuple[Engine, Seeded]) -> None:
    """run_summary, run_class_accuracy, run_pair_comparison and prediction_detail give the same numbers."""
    engine, data = seeded
    result = run_results(engine, data.run_a, by_class=True)
    comparison = compare_runs(engine, data.run_a, data.run_b)
    with engine.connect() as conn:
        summary = conn.execute(text("SELECT * FROM run_summary WHERE run_id = :r"), {"r": data.run_a}).mappings().one()
        classes = conn.execute(text("SELECT * FROM run_class_accuracy WHERE run_id = :r ORDER BY label"),
                               {"r": data.run_a}).mappings().all()
        pair = conn.execute(text("SELECT * FROM run_pair_comparison WHERE run_a = :a AND run_b = :b"),
                            {"a": data.run_a, "b": data.run_b}).mappings().one()
        detail = conn.execute(text("SELECT * FROM prediction_detail WHERE run_id = :r ORDER BY sample_index"),
                              {"r": data.run_a}).mappings().first()
    for key in ("done", "failed", "pending", "top1", "top5", "zeroshot_top1", "gain", "mean_seconds"):
        assert summary[key] == pytest.approx(result[key]), key
    assert [(c["label"], c["class_name"], c["n"]) for c in classes] == [
        (c["label"], c["name"], c["n"]) for c in result["classes"]]
    for key in ("both_right", "only_a", "only_b", "both_wrong"):
        assert pair[key] == comparison[key], key
    assert pair["difference"] == pytest.approx(comparison["difference"])
    assert detail is not None and detail["path"] == "/data/toy/class0/img0.png"
    assert detail["label_name"] == "class0"


def test_run_summary_counts_a_generation_run_from_its_shards(engine: Engine) -> None:
    """A generation run has no predictions: its done / failed / pending come from its shards' counters, as
    `runs list` reports them (the view used to show a finished generation run as all pending)."""
    with session_scope(engine) as session:
        version = make_dataset_version(session, 10, 2)
        spec = {"kind": "generate", "nonce": "g"}
        run = make_run(session, version, method="generate", kind="generate", spec=spec)
        make_shard(session, run, index=0, start=0, stop=6, samples_done=6)
        make_shard(session, run, index=1, start=6, stop=10, samples_done=3, samples_failed=1)
        run_id = run.id
    with engine.connect() as conn:
        row = conn.execute(text("SELECT kind, done, failed, pending FROM run_summary WHERE run_id = :r"),
                           {"r": run_id}).mappings().one()
    assert dict(row) == {"kind": "generate", "done": 9, "failed": 1, "pending": 0}


def test_cli_results_compare_export(engine: Engine, cli_env: dict[str, str], tmp_path: Path) -> None:
    """The commands print JSON/CSV from the services; an unknown run is one line and exit 2."""
    from cli.main import app

    data = seed(engine)
    runner = CliRunner()
    out = runner.invoke(app, ["results", str(data.run_a), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["done"] == len(data.mask_a)
    out = runner.invoke(app, ["results", str(data.run_a), "--by-class", "--csv"])
    assert out.exit_code == 0 and out.stdout.splitlines()[0] == "label,name,n,correct,top1,zeroshot_top1,gain"
    out = runner.invoke(app, ["compare", str(data.run_a), str(data.run_b), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["paired_samples"] == len(data.mask_a)
    target = tmp_path / "export.parquet"
    out = runner.invoke(app, ["export", str(data.run_a), "--format", "parquet", "--output", str(target)])
    assert out.exit_code == 0 and target.is_file()
    out = runner.invoke(app, ["results", str(data.run_a), "--ece-bins", "20", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["ece"] == pytest.approx(
        run_results(engine, data.run_a, ece_bins=20)["ece"]) and json.loads(out.stdout)["ece_bins"] == 20
    out = runner.invoke(app, ["results", str(data.run_a), "--ece-bins", "0"])
    assert out.exit_code == 2 and out.stderr.strip().splitlines() == [
        f"error: --ece-bins=0: must be an integer from 1 to {stats.MAX_ECE_BINS}"]
    out = runner.invoke(app, ["results", "4242"])
    assert out.exit_code == 2
    assert out.stderr.strip().splitlines() == ["error: RUN=4242: no such run; `difftpt-ops runs list` shows the runs"]
    # A RUN that is not an integer gets the same one line as `status`/`runs show`, naming the argument.
    for args, argument in ((["results", "abc"], "RUN"), (["export", "abc"], "RUN"), (["compare", "abc", "1"], "RUN_A"),
                           (["compare", "1", "abc"], "RUN_B")):
        out = runner.invoke(app, args)
        assert out.exit_code == 2, (args, out.output)
        assert out.stderr.strip().splitlines() == [
            f"error: {argument}=abc: not a run id (an integer); see `difftpt-ops runs list`"], args


def test_compare_names_each_runs_model_and_weights(engine: Engine, cli_env: dict[str, str]) -> None:
    """compare gives each run's model and recorded weights; two runs of one model name on other weights (its
    folder was replaced between them) are flagged, in JSON and in the text output."""
    from cli.main import app

    with session_scope(engine) as session:
        version = make_dataset_version(session, 4, 2)
        runs = []
        for weights in ("a" * 64, "b" * 64, "a" * 64):
            run = make_run(session, version, method="tpt", model_name="/weights/clip")
            make_predictions(session, run, [True, False, True, True])
            make_shard(session, run, provenance={"device": "cpu", "weights": weights})
            runs.append(run.id)
    first, other, same = runs
    payload = compare_runs(engine, first, other)
    assert payload["run_a"]["weights"] == "a" * 64 and payload["run_b"]["weights"] == "b" * 64
    assert payload["run_a"]["model"] == "/weights/clip" and payload["same_model_other_weights"] is True
    assert compare_runs(engine, first, same)["same_model_other_weights"] is False
    out = CliRunner().invoke(app, ["compare", str(first), str(other)])
    assert out.exit_code == 0, out.output
    assert "other weights (sha256 aaaaaaaaaaaa vs bbbbbbbbbbbb)" in out.stdout
    out = CliRunner().invoke(app, ["compare", str(first), str(same)])
    assert "other weights" not in out.stdout
