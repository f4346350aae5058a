"""`table`: every cell, average and p-value against a direct SQL computation, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import binomtest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from difftpt_ops.core.errors import InputError
from difftpt_ops.db.session import get_engine, session_scope, upgrade
from difftpt_ops.db.tables import Dataset, DatasetVersion, Run
from difftpt_ops.services.reading.published import load_published
from difftpt_ops.services.reading.table import build_table
from difftpt_ops.services.reading.table_model import AVERAGES, TableQuery
from difftpt_ops.services.reading.table_render import csv_rows, header, to_latex, to_markdown
from tests.factories import make_dataset, make_dataset_version, make_predictions, make_run, make_sample_errors
from tests.integration.test_jobs_support import make_settings

pytestmark = pytest.mark.integration

N_SAMPLES = 40


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = get_engine(database_url)
    upgrade(engine)
    yield engine


# What a DiffTPT spec submitted now holds beyond its name: a spec without it is one stored before the option
# existed, which read its generated views losslessly (a configuration of its own).
CURRENT = {"difftpt": {"generated_format": "source"}}


def _spec(method: str, model: str, dataset_fingerprint: str, seed: int = 0) -> dict[str, Any]:
    return {"kind": "tune", "method": {"method": method, **CURRENT.get(method, {})},
            "model": {"name": model, "pretrained": None}, "dataset_fingerprint": dataset_fingerprint, "seed": seed}


def _make(engine: Engine, layout: dict[str, tuple[str, list[str]]], *, model: str = "tiny",
          seeds: tuple[int, ...] = (0,), n: int = N_SAMPLES) -> dict[tuple[str, str, int], int]:
    """Datasets {name: (format, methods)}, one finished run per (dataset, method, seed) with random outcomes."""
    rng = random.Random(7)
    ids: dict[tuple[str, str, int], int] = {}
    with session_scope(engine) as session:
        for name, (fmt, methods) in layout.items():
            dataset = make_dataset(session, n_classes=4, name=name)
            dataset.format = fmt
            version = make_dataset_version(session, n_samples=n, dataset=dataset)
            for method in methods:
                for seed in seeds:
                    spec = _spec(method, model, version.fingerprint, seed)
                    run = make_run(session, version, method=method, spec=spec)
                    accuracy = rng.uniform(0.3, 0.8)
                    make_predictions(session, run, [rng.random() < accuracy for _ in range(n)],
                                     zeroshot_mask=[rng.random() < 0.5 for _ in range(n)])
                    ids[(name, method, seed)] = run.id
    return ids


def _sql_top1(engine: Engine, run_id: int) -> float:
    with engine.connect() as conn:
        return float(conn.execute(text(
            "SELECT AVG(CASE WHEN correct THEN 1.0 ELSE 0.0 END) FROM predictions WHERE run_id = :r"),
            {"r": run_id}).scalar_one())


def _sql_discordant(engine: Engine, run_a: int, run_b: int) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(text("""
            SELECT SUM(CASE WHEN a.correct AND NOT b.correct THEN 1 ELSE 0 END),
                   SUM(CASE WHEN b.correct AND NOT a.correct THEN 1 ELSE 0 END)
            FROM predictions a JOIN predictions b ON b.sample_id = a.sample_id AND b.run_id = :b
            WHERE a.run_id = :a"""), {"a": run_a, "b": run_b}).one()
    return int(row[0] or 0), int(row[1] or 0)


SMALL = {"shapes": ("imagefolder", ["zeroshot", "tpt", "difftpt"]), "toys": ("imagefolder", ["zeroshot", "tpt"])}


def test_cells_equal_sql_and_mcnemar_equals_scipy(engine: Engine) -> None:
    """Two datasets, three methods: each cell is the run's SQL accuracy, each p scipy's binomial test."""
    ids = _make(engine, SMALL)
    table = build_table(engine, TableQuery())
    assert table.baseline == "zeroshot" and table.model == "tiny"
    assert [r.label for r in table.rows] == ["zeroshot", "difftpt", "tpt"]
    tested = 0
    for row in table.rows:
        for dataset, cell in row.cells.items():
            run_id = ids[(dataset, row.method, 0)]
            assert cell.runs == [run_id] and cell.n == N_SAMPLES
            assert cell.value == pytest.approx(_sql_top1(engine, run_id), abs=1e-12)
            if row.method == "zeroshot":
                assert cell.p is None
                continue
            only_a, only_b = _sql_discordant(engine, run_id, ids[(dataset, "zeroshot", 0)])
            expected = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
            assert cell.p == pytest.approx(expected, rel=1e-9)
            assert cell.p_holm is not None and cell.p_holm >= cell.p
            tested += 1
    assert tested == 3


def test_missing_cell_is_missing_not_zero(engine: Engine) -> None:
    """difftpt never ran on `toys`: no cell, '–' in every text format, empty in CSV."""
    _make(engine, SMALL)
    table = build_table(engine, TableQuery())
    difftpt = next(r for r in table.rows if r.method == "difftpt")
    assert "toys" not in difftpt.cells
    line = next(line for line in to_markdown(table).splitlines() if line.startswith("| difftpt"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[header(table).index("toys")] == "–"
    csv_line = next(r for r in csv_rows(table) if r[0] == "difftpt" and r[3] == "toys")
    assert csv_line[4] == ""


def _markdown_widths(markdown: str) -> list[int]:
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    return [len(re.split(r"(?<!\\)\|", line.strip())[1:-1]) for line in rows]


def test_markdown_and_latex_parse_with_the_right_column_count(engine: Engine) -> None:
    """Every Markdown line and every LaTeX row has as many cells as the header; tabular spec agrees."""
    _make(engine, SMALL)
    table = build_table(engine, TableQuery(published=True))
    width = len(header(table))
    assert width == 3  # method + 2 datasets (no benchmark formats, so no average columns)
    widths = _markdown_widths(to_markdown(table))
    assert widths == [width] * (len(table.rows) + 2)
    latex = to_latex(table)
    spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", latex)
    assert spec is not None and len(spec.group(1)) == width
    body = [line for line in latex.splitlines() if line.endswith(r"\\")]
    assert len(body) == len(table.rows) + 1
    assert all(len(re.split(r"(?<!\\)&", line)) == width for line in body)


def test_seed_repeats_give_mean_and_std(engine: Engine) -> None:
    """Runs that differ only by seed make one cell: mean and sample standard deviation of their accuracies."""
    ids = _make(engine, {"shapes": ("imagefolder", ["zeroshot", "tpt"])}, seeds=(0, 1, 2))
    table = build_table(engine, TableQuery())
    cell = next(r for r in table.rows if r.method == "tpt").cells["shapes"]
    values = [_sql_top1(engine, ids[("shapes", "tpt", s)]) for s in (0, 1, 2)]
    assert cell.seeds == [0, 1, 2] and len(cell.runs) == 3
    assert cell.value == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert cell.std == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert "±" in to_markdown(table)


def test_a_seed_repeat_on_other_samples_is_left_out_and_named(engine: Engine) -> None:
    """Seeds 0 and 1 on the full version average; seed 2 planned 12 samples (another --limit), so it is not
    averaged in (other samples), and a note names it with the cell's run. An older run of seed 1 on 12 samples (on
    another device: the same spec would be the same run, extended) is an older run of a seed already shown: no
    note."""
    rng = random.Random(3)
    with session_scope(engine) as session:
        dataset = make_dataset(session, n_classes=4, name="shapes")
        version = make_dataset_version(session, n_samples=N_SAMPLES, dataset=dataset)
        ids = {}
        for label, seed, n in (("old1", 1, 12), ("s2", 2, 12), ("s1", 1, N_SAMPLES), ("s0", 0, N_SAMPLES)):
            device = {"device": "cuda"} if label == "old1" else {}
            spec = {**_spec("tpt", "tiny", version.fingerprint, seed), **device}
            run = make_run(session, version, method="tpt", spec=spec, num_samples=n)
            make_predictions(session, run, [rng.random() < 0.5 for _ in range(n)])
            ids[label] = run.id
    table = build_table(engine, TableQuery())
    cell = table.rows[0].cells["shapes"]
    assert sorted(cell.runs) == sorted([ids["s0"], ids["s1"]]) and cell.seeds == [0, 1]
    assert cell.value == pytest.approx(statistics.fmean(_sql_top1(engine, ids[k]) for k in ("s0", "s1")))
    assert table.other_limits == [(ids["s2"], ids["s0"])]
    assert f"run {ids['s2']} not averaged into the cell of run {ids['s0']}" in "\n".join(table.notes)
    assert [list(pair) for pair in table.to_dict()["other_limits"]] == [[ids["s2"], ids["s0"]]]


FAMILY = {"in": ("imagenet", ["zeroshot", "tpt"]), "in-a": ("imagenet-a", ["zeroshot", "tpt"]),
          "in-v2": ("imagenet-v2", ["zeroshot", "tpt"]), "in-r": ("imagenet-r", ["zeroshot", "tpt"]),
          "in-k": ("imagenet-sketch", ["zeroshot"]), "pets": ("pets", ["zeroshot", "tpt"])}


def test_averages_follow_the_papers_and_need_every_dataset(engine: Engine) -> None:
    """ImageNet+4 and the 4 shifts average SQL accuracies; a row missing a shift has no average, not a partial one."""
    ids = _make(engine, FAMILY, n=20)
    table = build_table(engine, TableQuery())
    assert table.columns == ["in", "in-a", "in-v2", "in-r", "in-k", "pets"]  # paper order, by format
    assert table.average_columns == [name for name, _ in AVERAGES]
    zeroshot = next(r for r in table.rows if r.method == "zeroshot")
    acc = {name: _sql_top1(engine, ids[(name, "zeroshot", 0)]) for name in FAMILY}
    assert zeroshot.averages["avg ImageNet+4"] == pytest.approx(
        statistics.fmean(acc[d] for d in ("in", "in-a", "in-v2", "in-r", "in-k")), abs=1e-12)
    assert zeroshot.averages["avg 4 shifts"] == pytest.approx(
        statistics.fmean(acc[d] for d in ("in-a", "in-v2", "in-r", "in-k")), abs=1e-12)
    assert zeroshot.averages["avg cross-domain"] is None  # 1 of the 10 sets
    tpt = next(r for r in table.rows if r.method == "tpt")
    assert tpt.averages["avg ImageNet+4"] is None and tpt.averages["avg 4 shifts"] is None


def test_published_rows_are_separate_and_differences_are_ours_minus_theirs(engine: Engine) -> None:
    """RN50 runs on ImageNet-A: published rows from the data file; our row minus published; our averages untouched."""
    _make(engine, {"in-a": ("imagenet-a", ["zeroshot", "tpt"])}, model="RN50")
    plain = build_table(engine, TableQuery())
    table = build_table(engine, TableQuery(published=True))
    published = {e["method"]: e["values"]["imagenet-a"] for e in load_published()["entries"]
                 if e["backbone"] == "RN50" and e["values"]["imagenet-a"] is not None}
    rows = {r.label: r for r in table.rows}
    for method in ("zeroshot", "tpt"):
        theirs = rows[f"{method} (published, RN50)"]
        assert theirs.kind == "published" and theirs.source
        assert theirs.cells["in-a"].value == pytest.approx(published[method] / 100)
        ours = rows[method].cells["in-a"].value
        assert rows[f"{method} - published"].cells["in-a"].value == pytest.approx(ours - published[method] / 100)
    ours_rows = [r for r in table.rows if r.kind == "ours"]
    assert [r.averages for r in ours_rows] == [r.averages for r in plain.rows]
    assert "dmn-zs (published, RN50)" in rows  # published-only methods are shown too


def test_bad_names_are_one_line_input_errors(engine: Engine) -> None:
    """Unknown method, dataset, baseline or model name the argument and value."""
    _make(engine, SMALL)
    for query, argument in ((TableQuery(methods=("nope",)), "--methods"), (TableQuery(datasets=("x",)), "--datasets"),
                            (TableQuery(baseline="nope"), "--baseline"), (TableQuery(model="ViT-L-14"), "--model")):
        with pytest.raises(InputError) as info:
            build_table(engine, query)
        assert info.value.argument == argument and "\n" not in str(info.value)
    with pytest.raises(InputError):
        TableQuery(metric="top3")
    for bins in (0, 1001):
        with pytest.raises(InputError, match="--ece-bins"):
            TableQuery(metric="ece", ece_bins=bins)


def test_ece_cells_are_the_runs_ece_over_the_bins_asked_for(engine: Engine) -> None:
    """An ECE table's cell is `results`' ECE of its run over the same bin count (15 unless asked; C-TPT's code
    uses 20), and the title says which."""
    from difftpt_ops.services.reading.results import run_results

    ids = _make(engine, SMALL)
    for bins in (15, 20):
        table = build_table(engine, TableQuery(metric="ece", ece_bins=bins))
        assert table.notes[0].startswith(f"ece over {bins} bins in % of model")
        for row in table.rows:
            for dataset, cell in row.cells.items():
                assert cell.value == pytest.approx(
                    run_results(engine, ids[(dataset, row.method, 0)], ece_bins=bins)["ece"], abs=1e-12)
    assert TableQuery(metric="ece", ece_bins=20).fingerprint() != TableQuery(metric="ece").fingerprint()


def test_cells_on_fewer_samples_say_so(engine: Engine) -> None:
    """A run that finished 30 of 40 samples: marked †, its n printed; the header carries the full n."""
    ids = _make(engine, {"shapes": ("imagefolder", ["zeroshot"])})
    with session_scope(engine) as session:
        zeroshot = session.get(Run, ids[("shapes", "zeroshot", 0)])
        version = session.get(DatasetVersion, zeroshot.dataset_version_id)
        run = make_run(session, version, method="tpt", spec=_spec("tpt", "tiny", version.fingerprint))
        make_predictions(session, run, [i % 2 == 0 for i in range(30)])
    table = build_table(engine, TableQuery())
    cell = next(r for r in table.rows if r.method == "tpt").cells["shapes"]
    assert cell.subset and cell.n == 30 and cell.paired_n == 30
    markdown = to_markdown(table)
    assert f"| method | shapes (n={N_SAMPLES}) |" in markdown
    assert "50.00† (n=30)" in markdown or "50.00*† (n=30)" in markdown


def _run_with(engine: Engine, version_id: int, method: str, overrides: dict[str, str], accuracy: float, *,
              device: str = "cpu", stored: dict[str, Any] | None = None) -> int:
    """A finished run whose stored method spec is what `submit` stores: resolved for the dataset's format."""
    from difftpt_ops.core.method_specs import method_spec_from
    from difftpt_ops.tta.methods import resolve_for_dataset

    with session_scope(engine) as session:
        version = session.get(DatasetVersion, version_id)
        fmt = session.get(Dataset, version.dataset_id).format
        method_spec = stored or resolve_for_dataset(method_spec_from(method, overrides), fmt).to_dict()
        spec = {"kind": "tune", "method": method_spec, "model": {"name": "tiny", "pretrained": None},
                "dataset_fingerprint": version.fingerprint, "seed": 0, "device": device}
        run = make_run(session, version, method=method, spec=spec)
        n = version.num_samples
        make_predictions(session, run, [i < round(accuracy * n) for i in range(n)])
        return int(run.id)


def _version(engine: Engine, name: str, fmt: str = "imagefolder") -> int:
    with session_scope(engine) as session:
        dataset = make_dataset(session, n_classes=4, name=name)
        dataset.format = fmt
        return int(make_dataset_version(session, n_samples=N_SAMPLES, dataset=dataset).id)


def test_each_configuration_of_a_method_is_its_own_row(engine: Engine) -> None:
    """zeroshot at its defaults and with the prompt ensemble are two rows, each with its own cells and averages,
    whichever ran last; the ensemble row is tested against the default one. A TDA run at the defaults resolved
    for its dataset has no configuration words; one with the single prompt has."""
    shift = {fmt: _version(engine, fmt, fmt) for fmt in ("imagenet-a", "imagenet-v2", "imagenet-r", "imagenet-sketch")}
    plain = {fmt: _run_with(engine, v, "zeroshot", {}, 0.5) for fmt, v in shift.items()}
    ensemble = {fmt: _run_with(engine, v, "zeroshot", {"prompts": "ensemble"}, 0.75) for fmt, v in shift.items()}
    tda = _run_with(engine, shift["imagenet-a"], "tda", {}, 0.6)  # the reference's "tip" prompts for the set
    tda_single = _run_with(engine, shift["imagenet-a"], "tda", {"prompts": "single"}, 0.4)
    table = build_table(engine, TableQuery())
    rows = {r.label: r for r in table.rows}
    assert list(rows) == ["zeroshot", "zeroshot prompts=ensemble", "tda", "tda prompts=single"]
    assert {d: c.runs for d, c in rows["zeroshot"].cells.items()} == {d: [plain[d]] for d in shift}
    assert {d: c.runs for d, c in rows["zeroshot prompts=ensemble"].cells.items()} == {d: [ensemble[d]] for d in shift}
    assert rows["zeroshot"].averages["avg 4 shifts"] == pytest.approx(0.5)
    assert rows["zeroshot prompts=ensemble"].averages["avg 4 shifts"] == pytest.approx(0.75)
    assert rows["zeroshot prompts=ensemble"].cells["imagenet-a"].baseline_run == plain["imagenet-a"]
    assert rows["tda"].cells["imagenet-a"].runs == [tda] and rows["tda prompts=single"].cells["imagenet-a"].runs == [
        tda_single]
    assert rows["zeroshot prompts=ensemble"].config == "prompts=ensemble" and rows["zeroshot"].config == ""
    assert any("a row per configuration" in note for note in table.notes)


def test_a_named_run_that_a_newer_one_hides_is_said(engine: Engine) -> None:
    """`--runs A,B` where B repeats A's configuration and dataset with the same seed (on another kind of device):
    B's cell, and a note for A."""
    version = _version(engine, "toys")
    older = _run_with(engine, version, "tpt", {}, 0.5)
    newer = _run_with(engine, version, "tpt", {}, 0.6, device="cuda")
    table = build_table(engine, TableQuery(run_ids=(older, newer)))
    assert [c.runs for r in table.rows for c in r.cells.values()] == [[newer]] and table.superseded == [(older, newer)]
    assert f"run {older} not shown: run {newer} is a newer run of its configuration on its dataset" in table.notes
    assert build_table(engine, TableQuery()).superseded == []  # only said of runs someone named


def test_a_cell_on_other_samples_than_the_baselines_is_marked(engine: Engine) -> None:
    """A limited online run covers the first samples of its stream, an episodic one the first by index: the
    cell is marked ‡ and its paired test uses the shared samples. Two runs that tried the same samples are not
    marked, even when their failures do not overlap."""
    from difftpt_ops.db.tables import Sample
    from difftpt_ops.services.reading.table_render import cell_text

    version_id = _version(engine, "photos")
    with session_scope(engine) as session:
        version = session.get(DatasetVersion, version_id)
        samples = list(session.query(Sample).filter(Sample.dataset_version_id == version_id).order_by(Sample.index))
        fmt_spec = {"kind": "tune", "model": {"name": "tiny", "pretrained": None},
                    "dataset_fingerprint": version.fingerprint, "seed": 0}
        base = make_run(session, version, method="zeroshot", spec={**fmt_spec, "method": {"method": "zeroshot"}},
                        num_samples=20)
        make_predictions(session, base, [True] * 18, samples=[x for i, x in enumerate(samples[:20]) if i not in (3, 4)])
        make_sample_errors(session, base, samples[3:5])
        shuffled = make_run(session, version, method="tpt", spec={**fmt_spec, "method": {"method": "tpt"}},
                            num_samples=20)
        make_predictions(session, shuffled, [True] * 20, samples=samples[6:26])
        failed = make_run(session, version, method="tpt", spec={**fmt_spec, "method": {"method": "tpt", "steps": 2}},
                          num_samples=20)
        tried = [x for i, x in enumerate(samples[:20]) if i not in (1, 2)]
        make_predictions(session, failed, [True] * 18, samples=tried)
        make_sample_errors(session, failed, samples[1:3])
    table = build_table(engine, TableQuery())
    cells = {r.label: r.cells["photos"] for r in table.rows}
    assert (cells["tpt"].other_samples, cells["tpt"].paired_n) == (True, 14)  # samples 6..19
    assert cell_text(cells["tpt"], "ours").endswith("†‡")
    assert (cells["tpt steps=2"].other_samples, cells["tpt steps=2"].paired_n) == (False, 16)
    assert any(note.startswith("‡ not the samples of the zeroshot cell") for note in table.notes)
    ece = {r.label: r.cells["photos"] for r in build_table(engine, TableQuery(metric="ece")).rows}
    assert [(ece[k].other_samples, ece[k].paired_n, ece[k].p) for k in ("tpt", "tpt steps=2")] == [
        (True, 14, None), (False, 16, None)]  # the same marks; calibration has no paired test


def test_difftpt_runs_on_other_generation_configs_are_other_rows(engine: Engine) -> None:
    """The generated images a DiffTPT run read change its numbers: a run that read another config than the
    newest DiffTPT run on its dataset is a row of its own, named by config id; the newest stays plain."""
    from tests.factories import make_generation_config

    version_id = _version(engine, "photos")
    with session_scope(engine) as session:
        version = session.get(DatasetVersion, version_id)
        configs = [make_generation_config(session, steps=steps).id for steps in (50, 25)]
        spec = _spec("difftpt", "tiny", version.fingerprint)
        runs = []
        for config in configs:
            run = make_run(session, version, method="difftpt", spec={**spec, "generation_fingerprint": str(config)},
                           generation_config_id=config)
            make_predictions(session, run, [True] * N_SAMPLES)
            runs.append(run.id)
    rows = {r.label: r.cells["photos"].runs for r in build_table(engine, TableQuery()).rows}
    assert rows == {"difftpt": [runs[1]], f"difftpt generation={configs[0]}": [runs[0]]}
    assert [r.label for r in build_table(engine, TableQuery(run_ids=(runs[0],))).rows] == ["difftpt"]
    with session_scope(engine) as session:  # a DiffTPT run stored before generated_format: its own row
        version = session.get(DatasetVersion, version_id)
        old_spec = {**spec, "method": {"method": "difftpt"}, "generation_fingerprint": str(configs[1]), "seed": 1}
        old = make_run(session, version, method="difftpt", spec=old_spec, generation_config_id=configs[1])
        make_predictions(session, old, [True] * N_SAMPLES)
        old_id = old.id
    rows = {r.label: r.cells["photos"].runs for r in build_table(engine, TableQuery()).rows}
    assert rows["difftpt generated_format=lossless"] == [old_id] and rows["difftpt"] == [runs[1]]


def test_runs_show_names_the_configuration_of_a_run_stored_before_it_had_one(engine: Engine, database_url: str,
                                                                             tmp_path: Path) -> None:
    """A ZERO run stored before `vote` existed (no key; its `settings` column empty): `runs show`, `runs list`
    and `status` say `vote=argmax`, the word `table` puts on its row."""
    from difftpt_ops.services.running.status import list_runs, run_status, show_run

    settings = make_settings(tmp_path, database_url)

    version_id = _version(engine, "photos")
    stored = {key: value for key, value in method_spec_dict("zero").items() if key != "vote"}
    run_id = _run_with(engine, version_id, "zero", {}, 0.5, stored=stored)
    assert show_run(engine, run_id)["settings"] == "vote=argmax"
    assert [r["settings"] for r in list_runs(engine, settings)] == ["vote=argmax"]
    assert run_status(engine, settings, run_id)[0]["settings"] == "vote=argmax"
    assert [r.label for r in build_table(engine, TableQuery()).rows] == ["zero vote=argmax"]


def method_spec_dict(method: str) -> dict[str, Any]:
    from difftpt_ops.core.method_specs import method_spec_from
    from difftpt_ops.tta.methods import resolve_for_dataset

    return resolve_for_dataset(method_spec_from(method), "imagefolder").to_dict()


def test_published_row_stays_when_a_method_has_only_other_configurations(engine: Engine) -> None:
    """A method whose runs are all at another configuration than its defaults (`zeroshot prompts=ensemble`, a
    DMN run stored before crop_min): no difference row under them, but its published row is still shown."""
    with session_scope(engine) as session:
        dataset = make_dataset(session, n_classes=4, name="in-a")
        dataset.format = "imagenet-a"
        version = make_dataset_version(session, n_samples=10, dataset=dataset)
        for method in ({"method": "zeroshot", "prompts": "ensemble"}, {"method": "dmn-zs"}):
            spec = {"kind": "tune", "method": method, "model": {"name": "RN50", "pretrained": None},
                    "dataset_fingerprint": version.fingerprint, "seed": 0}
            make_predictions(session, make_run(session, version, method=method["method"], spec=spec), [True] * 10)
    table = build_table(engine, TableQuery(published=True))
    labels = [r.label for r in table.rows]
    assert "zeroshot (published, RN50)" in labels and "dmn-zs (published, RN50)" in labels, labels
    assert not any(r.kind == "difference" for r in table.rows)
    # the baseline is zero-shot's only row, and the words say which
    assert table.baseline_row == "zeroshot prompts=ensemble" and table.to_dict()["baseline_row"] == table.baseline_row
    assert any("against zeroshot prompts=ensemble" in note for note in table.notes), table.notes


def test_seed_repeats_on_other_devices_average_and_a_rerun_of_a_seed_replaces_it(engine: Engine) -> None:
    """Seeds 0 and 1 on CUDA in fp16, seed 2 later on the CPU in fp32: one row (precision is no configuration
    word) whose cell averages the three seeds. Seed 0 run again on the CPU replaces the CUDA run of seed 0."""
    version_id = _version(engine, "photos")
    ids = []
    with session_scope(engine) as session:
        version = session.get(DatasetVersion, version_id)
        for seed, device, precision, right in ((0, "cuda", "fp16", 10), (1, "cuda", "fp16", 12),
                                               (2, "cpu", "fp32", 14), (0, "cpu", "fp32", 16)):
            spec = _spec("tpt", "tiny", version.fingerprint, seed=seed)
            spec["device"], spec["model"]["precision"] = device, precision
            run = make_run(session, version, method="tpt", spec=spec)
            make_predictions(session, run, [i < right for i in range(N_SAMPLES)])
            ids.append(run.id)
    [row] = build_table(engine, TableQuery()).rows
    cell = row.cells["photos"]
    assert (row.label, cell.runs, cell.seeds) == ("tpt", sorted(ids[1:]), [0, 1, 2])
    assert cell.value == pytest.approx(statistics.fmean([12, 14, 16]) / N_SAMPLES)
    table = build_table(engine, TableQuery(run_ids=tuple(ids)))
    assert table.superseded == [(ids[0], ids[3])]


def test_a_tune_time_estimate_uses_only_runs_of_its_model_on_its_device(engine: Engine) -> None:
    """`--dry-run`'s time per sample comes from earlier runs of the method with the same model on the same kind
    of device; runs of other models or devices are named in the words, never offered as the figure."""
    from difftpt_ops.services.running.estimate import _tune_seconds_per_sample
    from tests.factories import make_shard

    version_id = _version(engine, "photos")
    with session_scope(engine) as session:
        version = session.get(DatasetVersion, version_id)
        for model, device, seconds in (("tiny", "cpu", 8.0), ("ViT-B-16", "cuda", 2.0)):
            spec = {**_spec("tpt", model, version.fingerprint), "device": device}
            make_shard(session, make_run(session, version, method="tpt", spec=spec), seconds=seconds,
                       samples_done=N_SAMPLES)
        assert _tune_seconds_per_sample(session, "tpt", "ViT-B-16", "cuda") == (
            2.0 / N_SAMPLES, f"measured: {N_SAMPLES} sample(s) of earlier tpt runs with ViT-B-16 on cuda on this "
            "deployment")
        seconds, words = _tune_seconds_per_sample(session, "tpt", "ViT-B-16", "cpu")
        assert seconds is None and words.startswith("none yet for tpt with ViT-B-16 on cpu; other models or devices")
        assert _tune_seconds_per_sample(session, "zero", "ViT-B-16", "cuda")[0] is None


def test_seeds_computed_with_other_weights_are_not_averaged_and_the_table_says_so(engine: Engine) -> None:
    """The model folder's weights were replaced between runs (the same --model path): a seed run on the new
    weights is not averaged into the old ones' cell, and a table whose cells used different weights says so
    (with the runs of each). A run from before weights were recorded averages in as before."""
    from tests.factories import make_shard

    version_id = _version(engine, "photos")
    old, new = "a" * 64, "b" * 64
    ids = []
    with session_scope(engine) as session:
        version = session.get(DatasetVersion, version_id)
        for method, seed, weights, right in (("zeroshot", 0, old, 10), ("tpt", 0, old, 12), ("tpt", 1, None, 14),
                                             ("tpt", 2, new, 16)):
            run = make_run(session, version, method=method, spec=_spec(method, "tiny", version.fingerprint, seed))
            make_predictions(session, run, [i < right for i in range(N_SAMPLES)])
            make_shard(session, run, provenance={"device": "cpu", **({"weights": weights} if weights else {})})
            ids.append(run.id)
    table = build_table(engine, TableQuery())
    tpt = next(r for r in table.rows if r.method == "tpt").cells["photos"]
    # The newest tpt run (seed 2, new weights) makes the cell; seeds 0 (old weights) and 1 (unrecorded) do not
    # both join it: seed 0 ran on other weights.
    assert tpt.runs == [ids[2], ids[3]] and tpt.seeds == [1, 2]
    assert table.weights == {old: [ids[0]], new: [ids[3]]}
    [note] = [n for n in table.notes if "not the same weights" in n]
    assert f"sha256 {old[:12]} in runs {ids[0]}" in note and f"sha256 {new[:12]} in runs {ids[3]}" in note
    # One set of weights: no note.
    same = build_table(engine, TableQuery(run_ids=(ids[1], ids[0])))
    assert same.weights == {old: [ids[0], ids[1]]} and not [n for n in same.notes if "weights" in n]
