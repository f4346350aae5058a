"""The experiment table: methods as rows, datasets as columns, the papers' averages, paired tests.

A row is one configuration of a method (`services.reading.configurations`: `zeroshot` and `zeroshot
prompts=ensemble` are two rows). For each (row, dataset) the latest finished tuning run of one model makes the
cell (or the runs named); runs that differ from it only by seed make it a mean plus-minus standard deviation. Every
count comes from the database in a few grouped queries (per-run counts, calibration bins when the metric is
ECE, the paired counts of each cell against the baseline, and the failed samples, which tell whether two runs
tried the same samples), so a table of 200 runs and 200,000 predictions costs a few index scans, not 200 round
trips.

Statistics: a cell's paired test is the exact McNemar test of its latest run against the baseline
method's latest run on the same dataset version (samples both finished); p-values are Holm-corrected
across the table. Averages follow the papers: ImageNet plus its 4 shifts, the 4 shifts alone, and the
10 cross-domain sets, each only over a row's own cells and only when all its datasets are present.
Published numbers (data/published.json) are separate rows and never enter our averages.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.engine import Engine

from difftpt_ops.core.errors import InputError, NotFoundError
from difftpt_ops.core.specs import canonical_json
from difftpt_ops.services.reading import stats
from difftpt_ops.services.reading.configurations import NO_EFFECT_KEYS, SEED_KEYS, configuration
from difftpt_ops.services.reading.published import add_published
from difftpt_ops.services.reading.results import confidence_bin_sql, recorded_weights
from difftpt_ops.services.reading.table_model import (
    PAPER_ORDER,
    Cell,
    Row,
    RunRow,
    Table,
    TableQuery,
    average_columns,
    row_averages,
)


def build_table(engine: Engine, query: TableQuery) -> Table:
    """Tabulate finished tuning runs (see the module docstring).

    Raises:
        InputError: an unknown method, dataset, baseline, run or sweep named in the query.
    """
    with engine.connect() as conn:
        runs = _select_runs(conn, query)
        model = _resolve_model(runs, query)
        other_model = sorted(r.run_id for r in runs if model is not None and r.model != model)
        runs = [r for r in runs if model is None or r.model == model]
        _check_names(runs, query)
        _set_configurations(runs, query)
        _load_counts(conn, runs, query)
        _load_weights(conn, runs)
        cells, baseline, other_limits = _cells(runs, query)
        _paired_tests(conn, cells, baseline, query)
    columns, formats = _columns(runs)
    shown = {run_id for row in cells.values() for cell, _ in row.values() for run_id in cell.runs}
    table = Table(query=query, model=model, metric=query.metric, baseline=baseline, columns=columns,
                  formats=formats, average_columns=average_columns(formats), rows=[], notes=[],
                  superseded=_superseded(runs, cells, shown) if query.run_ids else [],
                  other_model=other_model if query.run_ids else [],
                  weights=_weights_shown(runs, shown), other_limits=other_limits)
    table.rows = _our_rows(cells, table)
    base_key = baseline_row(cells, baseline) if baseline is not None else None
    table.baseline_row = row_label(base_key) if base_key is not None else None
    if query.published:
        add_published(table, query)
    table.notes = _notes(table)
    return table


# --- selecting runs -------------------------------------------------------------------------------------------------


def _superseded(runs: list[RunRow], cells: Cells, shown: set[int]) -> list[tuple[int, int]]:
    """(run, the newer run its cell shows instead) for the runs no cell shows."""
    return sorted((run.run_id, cells[_row_key(run)][run.dataset][1].run_id) for run in runs
                  if run.run_id not in shown)


def _select_runs(conn: Connection, query: TableQuery) -> list[RunRow]:
    """Finished tuning runs (all, the ones named, or a sweep's), newest first."""
    where = ["r.kind = 'tune'", "r.state IN ('finished', 'finished_with_failures')"]
    params: dict[str, Any] = {}
    if query.run_ids:
        where.append(f"r.id IN ({', '.join(str(int(i)) for i in query.run_ids)})")
    if query.sweep_id is not None:
        if conn.execute(text("SELECT 1 FROM sweeps WHERE id = :s"), {"s": query.sweep_id}).first() is None:
            raise NotFoundError("--sweep", query.sweep_id, "no such sweep; `difftpt-ops runs list` shows them")
        where.append("r.id IN (SELECT run_id FROM sweep_runs WHERE sweep_id = :sweep)")
        params["sweep"] = query.sweep_id
    rows = conn.execute(text(f"""
        SELECT r.id, r.method, r.spec, r.num_samples, v.id, v.num_samples, v.subset_size, d.name, d.format,
               r.generation_config_id
        FROM runs r JOIN dataset_versions v ON v.id = r.dataset_version_id JOIN datasets d ON d.id = v.dataset_id
        WHERE {' AND '.join(where)} ORDER BY r.id DESC"""), params).all()
    runs = [RunRow(run_id=int(r[0]), method=str(r[1]), spec=_json(r[2]), num_samples=int(r[3]),
                   version_id=int(r[4]), version_size=int(r[5]), subset_size=r[6], dataset=str(r[7]),
                   format=str(r[8]), generation_config=r[9]) for r in rows]
    if query.run_ids:
        missing = sorted(set(query.run_ids) - {r.run_id for r in runs})
        if missing:
            raise NotFoundError("--runs", ",".join(map(str, missing)), "no such finished tuning run")
    if query.sweep_id is not None:
        _set_variants(conn, runs, query.sweep_id)
    return [r for r in runs if (not query.methods or r.method in query.methods)
            and (not query.datasets or r.dataset in query.datasets)]


def _json(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else json.loads(value)


def _set_variants(conn: Connection, runs: list[RunRow], sweep_id: int) -> None:
    """In a sweep table each grid point (seed aside) is its own row: `tpt steps=2`."""
    points = {int(run_id): _json(point) for run_id, point in conn.execute(
        text("SELECT run_id, point FROM sweep_runs WHERE sweep_id = :s"), {"s": sweep_id})}
    spec = conn.execute(text("SELECT spec FROM sweeps WHERE id = :s"), {"s": sweep_id}).scalar()
    grid: dict[str, list[Any]] = (_json(spec).get("grid") or {}) if spec is not None else {}
    for run in runs:
        point = {k: v for k, v in points.get(run.run_id, {}).items() if k not in SEED_KEYS}
        run.variant = " ".join(f"{k}={v}" for k, v in sorted(point.items()))
        run.variant_rank = tuple(_index(grid.get(k, []), point[k]) for k in grid if k in point)


def _index(values: list[Any], value: Any) -> int:
    """Where a grid point's value stands among its key's values (unknown ones last)."""
    shown = [str(v) for v in values]
    return shown.index(str(value)) if str(value) in shown else len(shown)


def _set_configurations(runs: list[RunRow], query: TableQuery) -> None:
    """Each run's configuration, its model settings compared with the newest run's; a DiffTPT run that read
    another generation config than the newest run of its configuration on its dataset also names its config.
    In a sweep table the grid point tells the rows apart, and the sweep's runs share everything else."""
    if query.sweep_id is not None or not runs:
        return
    model = runs[0].spec.get("model") or {}
    newest: dict[tuple[str, str, str], int | None] = {}
    for run in runs:  # newest first
        run.config = configuration(run.spec, run.format, model=model)
        current = newest.setdefault((run.method, run.dataset, run.config), run.generation_config)
        if run.generation_config != current:
            run.config = " ".join(w for w in (run.config, f"generation={run.generation_config}") if w)


def _resolve_model(runs: list[RunRow], query: TableQuery) -> str | None:
    """The model asked for, else the model of the newest run (a table compares one model)."""
    if query.model is not None:
        if query.model not in {r.model for r in runs}:
            known = ", ".join(sorted({r.model for r in runs})) or "none"
            raise InputError("--model", query.model, f"no finished runs with this model (models: {known})")
        return query.model
    return runs[0].model if runs else None


def _check_names(runs: list[RunRow], query: TableQuery) -> None:
    present_methods = {r.method for r in runs}
    for method in query.methods:
        if method not in present_methods:
            raise InputError("--methods", method, "no finished runs of this method for the model")
    present_datasets = {r.dataset for r in runs}
    for dataset in query.datasets:
        if dataset not in present_datasets:
            raise InputError("--datasets", dataset, "no finished runs on this dataset for the model")
    if query.baseline is not None and query.baseline not in present_methods:
        raise InputError("--baseline", query.baseline, "no finished runs of this method in the table")


# --- counting --------------------------------------------------------------------------------------------------------


def _id_list(runs: list[RunRow]) -> str:
    return ", ".join(str(r.run_id) for r in runs) or "NULL"


def _load_counts(conn: Connection, runs: list[RunRow], query: TableQuery) -> None:
    """Per-run done / correct / top-5 counts in one grouped query (and ECE bins when asked)."""
    by_id = {r.run_id: r for r in runs}
    for run_id, n, correct, top5 in conn.execute(text(f"""
            SELECT run_id, COUNT(*), SUM(CASE WHEN correct THEN 1 ELSE 0 END),
                   SUM(CASE WHEN top5_correct THEN 1 ELSE 0 END)
            FROM predictions WHERE run_id IN ({_id_list(runs)}) GROUP BY run_id""")):
        run = by_id[int(run_id)]
        run.n, run.correct, run.top5 = int(n), int(correct or 0), int(top5 or 0)
    if query.metric == "ece":
        _load_ece(conn, runs, query.ece_bins)


def _load_weights(conn: Connection, runs: list[RunRow]) -> None:
    """Each run's CLIP weights (sha256) as its shards recorded them; None for runs from before they were."""
    weights = recorded_weights(conn, [r.run_id for r in runs])
    for run in runs:
        run.weights = weights.get(run.run_id)


def _weights_shown(runs: list[RunRow], shown: set[int]) -> dict[str, list[int]]:
    """The weights of the runs the table shows, each with its runs (more than one: cells of one model name that
    were computed with different weights)."""
    out: dict[str, list[int]] = {}
    for run in sorted(runs, key=lambda r: r.run_id):
        if run.run_id in shown and run.weights is not None:
            out.setdefault(run.weights, []).append(run.run_id)
    return out


def _load_ece(conn: Connection, runs: list[RunRow], n_bins: int) -> None:
    bins: dict[int, list[stats.CalibrationBin]] = defaultdict(list)
    for run_id, b, n, c, s in conn.execute(text(f"""
            SELECT run_id, b, COUNT(*), SUM(c), SUM(conf) FROM (
                SELECT run_id, {confidence_bin_sql(conn.dialect.name, n_bins)} AS b,
                       CASE WHEN correct THEN 1 ELSE 0 END AS c, confidence_after AS conf
                FROM predictions WHERE run_id IN ({_id_list(runs)}) AND confidence_after IS NOT NULL) t
            GROUP BY run_id, b""")):
        bins[int(run_id)].append(stats.CalibrationBin(int(b), int(n), int(c), float(s)))
    for run in runs:
        run.ece = stats.expected_calibration_error(bins.get(run.run_id, []))


# --- cells -----------------------------------------------------------------------------------------------------------


def seed_group_key(spec: dict[str, Any]) -> str:
    """The spec without what may differ among repeats of one configuration: its seeds, and what `configuration`
    does not count (the device and the precision submit derived from it, `features`). Runs with equal keys in
    one row are its seed repeats."""
    stripped = {k: v for k, v in spec.items() if k not in SEED_KEYS and k != "device"}
    method, model = stripped.get("method"), stripped.get("model")
    if isinstance(method, dict):
        stripped["method"] = {k: v for k, v in method.items() if k not in SEED_KEYS and k not in NO_EFFECT_KEYS}
    if isinstance(model, dict):
        stripped["model"] = {k: v for k, v in model.items() if k != "precision"}
    return canonical_json(stripped)


def _seeds(spec: dict[str, Any]) -> str:
    """What tells two seed repeats apart: the run's seed and the method's (an online method's order_seed)."""
    method = spec.get("method") if isinstance(spec.get("method"), dict) else {}
    return canonical_json([[spec.get(k) for k in SEED_KEYS], [method.get(k) for k in SEED_KEYS]])


RowKey = tuple[str, str, str]  # method, sweep variant, configuration
Cells = dict[RowKey, dict[str, tuple[Cell, RunRow]]]


def _row_key(run: RunRow) -> RowKey:
    return run.method, run.variant, run.config


def _cells(runs: list[RunRow], query: TableQuery) -> tuple[Cells, str | None, list[tuple[int, int]]]:
    """Per row and dataset: the newest run and the runs that repeat it with other seeds; and (run, the newest run
    of its cell) for each seed repeat left out because it planned other samples."""
    newest: dict[tuple[RowKey, str], RunRow] = {}
    for run in runs:  # newest first
        newest.setdefault((_row_key(run), run.dataset), run)
    cells: Cells = defaultdict(dict)
    other_limits = []
    for (row_key, dataset), latest in newest.items():
        group, other = _repeats(runs, latest)
        cells[row_key][dataset] = (_cell(latest, group, query.metric), latest)
        other_limits += [(run.run_id, latest.run_id) for run in other]
    methods = {key[0] for key in cells}
    baseline = query.baseline or ("zeroshot" if "zeroshot" in methods else None)
    return dict(cells), baseline, sorted(other_limits)


def _repeats(runs: list[RunRow], latest: RunRow) -> tuple[list[RunRow], list[RunRow]]:
    """The newest run of each seed that repeats `latest` on its samples (a rerun on another device replaces,
    never averages in), and the newest run of each other seed that would repeat it but planned another number of
    samples (another --limit: other samples, so it is left out). `runs` is newest first."""
    group, seeds, other = list[RunRow](), set[str](), dict[str, RunRow]()
    for run in runs:
        if not _may_repeat(run, latest):
            continue
        seed = _seeds(run.spec)
        if run.num_samples == latest.num_samples:
            if seed not in seeds:
                seeds.add(seed)
                group.append(run)
        else:
            other.setdefault(seed, run)
    return group, [run for seed, run in other.items() if seed not in seeds]


def _may_repeat(run: RunRow, latest: RunRow) -> bool:
    """Whether `run` repeats `latest` with another seed, as far as its row, dataset version, weights (the same
    path, other weights: another model) and spec go; a repeat must also plan the same samples."""
    return (_row_key(run) == _row_key(latest) and run.version_id == latest.version_id
            and _same_weights(run, latest) and seed_group_key(run.spec) == seed_group_key(latest.spec))


def _same_weights(run: RunRow, other: RunRow) -> bool:
    """Equal recorded weights; a run from before weights were recorded counts as the same."""
    return run.weights is None or other.weights is None or run.weights == other.weights


def _cell(latest: RunRow, group: list[RunRow], metric: str) -> Cell:
    values = [v for v in (r.value(metric) for r in group) if v is not None]
    return Cell(dataset=latest.dataset, value=statistics.fmean(values) if values else None,
                std=statistics.stdev(values) if len(values) > 1 else None, n=latest.n,
                runs=sorted(r.run_id for r in group), seeds=sorted((r.seed for r in group), key=str),
                subset=latest.subset_size is not None or latest.num_samples < latest.version_size
                or latest.n < latest.num_samples)


def _paired_tests(conn: Connection, cells: Cells, baseline: str | None, query: TableQuery) -> None:
    """Exact McNemar of every non-baseline cell against the baseline row's cell, then Holm across the table.
    ECE has no paired test, but its cells too say on how many samples they meet the baseline's, and whether
    those are other samples (‡)."""
    if baseline is None:
        return
    base_key = baseline_row(cells, baseline)
    base_cells = cells.get(base_key, {}) if base_key is not None else {}
    pairs: list[tuple[Cell, int, int]] = []
    for key, row in cells.items():
        if key == base_key:
            continue
        for dataset, (cell, run) in row.items():
            base = base_cells.get(dataset)
            if base is not None and base[1].version_id == run.version_id and base[1].run_id != run.run_id:
                cell.baseline_run = base[1].run_id
                pairs.append((cell, run.run_id, base[1].run_id))
    run_pairs = [(a, b) for _, a, b in pairs]
    counts = _discordant_counts(conn, run_pairs, "top1" if query.metric == "ece" else query.metric)
    found = [counts.get((a, b), (0, 0, 0)) for _, a, b in pairs]
    finished = {run.run_id: run.n for row in cells.values() for _, run in row.values()}
    differ = _other_samples(conn, pairs, finished, [n for n, _, _ in found])
    for (cell, a, b), (n, _, _) in zip(pairs, found, strict=True):
        cell.paired_n, cell.other_samples = n, (a, b) in differ
    if query.metric == "ece":
        return
    p_values = stats.mcnemar_exact_p_many([(only_a, only_b) for _, only_a, only_b in found])
    for (cell, _, _), p in zip(pairs, p_values, strict=True):
        cell.p = p
    for (cell, _, _), adjusted in zip(pairs, stats.holm_adjust(p_values), strict=True):
        cell.p_holm, cell.significant = adjusted, adjusted < query.alpha


def baseline_row(cells: Cells, baseline: str) -> RowKey | None:
    """The baseline method's row: at its defaults when it has such a row, else its first (in a sweep table, its
    first grid point)."""
    keys = sorted((k for k in cells if k[0] == baseline), key=lambda k: _row_order(cells, k))
    return next((k for k in keys if k[2] == ""), keys[0] if keys else None)


def _row_order(cells: Cells, key: RowKey) -> tuple[str, tuple[int, ...], str, str]:
    """Rows of a method: sweep variants in grid order, then by name; configurations by name."""
    rank = next(iter(cells[key].values()))[1].variant_rank
    return key[0], rank, key[1], key[2]


def _discordant_counts(conn: Connection, pairs: list[tuple[int, int]],
                       metric: str) -> dict[tuple[int, int], tuple[int, int, int]]:
    """(paired samples, only A right, only B right) for each (A, B) run pair, in one query."""
    if not pairs:
        return {}
    column = "correct" if metric == "top1" else "top5_correct"
    values = ", ".join(f"({int(a)}, {int(b)})" for a, b in pairs)  # integers we produced: no injection
    rows = conn.execute(text(f"""
        WITH pairs(run_a, run_b) AS (VALUES {values})
        SELECT p.run_a, p.run_b, COUNT(*),
               SUM(CASE WHEN a.{column} AND NOT b.{column} THEN 1 ELSE 0 END),
               SUM(CASE WHEN b.{column} AND NOT a.{column} THEN 1 ELSE 0 END)
        FROM pairs p JOIN predictions a ON a.run_id = p.run_a
        JOIN predictions b ON b.run_id = p.run_b AND b.sample_id = a.sample_id
        GROUP BY p.run_a, p.run_b""")).all()
    return {(int(a), int(b)): (int(n), int(x or 0), int(y or 0)) for a, b, n, x, y in rows}


def _other_samples(conn: Connection, pairs: list[tuple[Cell, int, int]], finished: dict[int, int],
                   both_finished: list[int]) -> set[tuple[int, int]]:
    """The (A, B) run pairs that did not try the same samples (tried: a prediction or a failure); `finished`
    holds each run's predictions, `both_finished` each pair's shared ones. An online run's --limit takes the
    first n of its stream, an episodic one's the first n by index; failures alone do not set runs apart.
    Failures are few, so only they are read here: tried by both = both finished + A's failures B tried + B's
    failures A finished."""
    if not pairs:
        return set()
    values = ", ".join(f"({int(a)}, {int(b)})" for _, a, b in pairs)  # integers we produced: no injection
    ids = ", ".join(str(int(i)) for i in {i for _, a, b in pairs for i in (a, b)})
    failed = {int(r): int(n) for r, n in conn.execute(text(
        f"SELECT run_id, COUNT(*) FROM sample_errors WHERE run_id IN ({ids}) GROUP BY run_id"))}
    shared_failures: dict[tuple[int, int], int] = defaultdict(int)
    if failed:
        for a, b, n in conn.execute(text(f"""
                WITH pairs(run_a, run_b) AS (VALUES {values})
                SELECT p.run_a, p.run_b, COUNT(*) FROM pairs p JOIN sample_errors e ON e.run_id = p.run_a
                WHERE EXISTS (SELECT 1 FROM predictions x WHERE x.run_id = p.run_b AND x.sample_id = e.sample_id)
                   OR EXISTS (SELECT 1 FROM sample_errors y WHERE y.run_id = p.run_b AND y.sample_id = e.sample_id)
                GROUP BY p.run_a, p.run_b
                UNION ALL
                SELECT p.run_a, p.run_b, COUNT(*) FROM pairs p JOIN sample_errors e ON e.run_id = p.run_b
                WHERE EXISTS (SELECT 1 FROM predictions x WHERE x.run_id = p.run_a AND x.sample_id = e.sample_id)
                GROUP BY p.run_a, p.run_b""")):
            shared_failures[(int(a), int(b))] += int(n)
    differ = set()
    for (_, a, b), shared in zip(pairs, both_finished, strict=True):
        tried_a, tried_b = finished[a] + failed.get(a, 0), finished[b] + failed.get(b, 0)
        if shared + shared_failures[(a, b)] < min(tried_a, tried_b):
            differ.add((a, b))
    return differ


# --- columns, rows and averages --------------------------------------------------------------------------------------


def _columns(runs: list[RunRow]) -> tuple[list[str], dict[str, str]]:
    """Dataset names in the papers' order (by registered format), then the others alphabetically."""
    formats = {r.dataset: r.format for r in runs}
    rank = {fmt: i for i, fmt in enumerate(PAPER_ORDER)}
    columns = sorted(formats, key=lambda d: (rank.get(formats[d], len(rank)), d))
    return columns, formats


def _our_rows(cells: Cells, table: Table) -> list[Row]:
    """Our rows: the baseline first, then methods by name, each at its defaults first, then its other
    configurations (variants of a sweep in grid order)."""
    def order(key: RowKey) -> tuple[int, tuple[str, tuple[int, ...], str, str]]:
        return 0 if key[0] == table.baseline else 1, _row_order(cells, key)

    rows = []
    for key in sorted(cells, key=order):
        row_cells = {dataset: cell for dataset, (cell, _) in cells[key].items()}
        values = {d: c.value for d, c in row_cells.items()}
        label = row_label(key)
        rows.append(Row(label=label, method=key[0], kind="ours", cells=row_cells,
                        averages=row_averages(values, table), config=key[2]))
    return rows


def row_label(key: RowKey) -> str:
    """A row's name: the method, then its sweep grid point and configuration words."""
    return " ".join(part for part in key if part)


def _notes(table: Table) -> list[str]:
    metric = f"ece over {table.query.ece_bins} bins" if table.metric == "ece" else table.metric
    notes = [f"{metric} in % of model {table.model or '-'}"] if table.rows else []
    if table.baseline is not None and table.metric != "ece":
        notes.append(f"* Holm-corrected exact McNemar p < {table.query.alpha} against {table.baseline_row} "
                     "(latest runs, samples both finished)")
    if any(c.subset for r in table.rows for c in r.cells.values()):
        notes.append("† evaluated on a subset of the dataset (n = samples done)")
    if any(c.other_samples for r in table.rows for c in r.cells.values()):
        notes.append(f"‡ not the samples of the {table.baseline_row} cell (an online method's --limit takes the first "
                     "n of its stream): its paired test uses the samples both have (paired_n in JSON and CSV)")
    if any(c.std is not None for r in table.rows for c in r.cells.values()):
        notes.append("± standard deviation over runs that differ only by seed (an online method's: by order seed)")
    if any(r.config for r in table.rows):
        notes.append("a row per configuration: settings after the method's name differ from its defaults for "
                     "the dataset")
    for old, new in table.other_limits:
        notes.append(f"run {old} not averaged into the cell of run {new}: it repeats it with another seed but "
                     "planned another number of samples (another --limit), so it covers other samples")
    for old, new in table.superseded:
        notes.append(f"run {old} not shown: run {new} is a newer run of its configuration on its dataset")
    if len(table.weights) > 1:
        kinds = "; ".join(f"sha256 {digest[:12]} in runs {', '.join(map(str, ids))}"
                          for digest, ids in table.weights.items())
        notes.append(f"the model {table.model} was not the same weights in every cell ({kinds}): its folder changed "
                     "between runs, so rows computed with different weights compare two models")
    if table.other_model:
        notes.append(f"runs {', '.join(map(str, table.other_model))} not shown: another model than "
                     f"{table.model} (--model chooses)")
    if any(r.kind == "published" for r in table.rows):
        notes.append("published rows: numbers as printed by their source (data/published.json); "
                     "never part of our averages")
    elif table.query.published:
        notes.append("no published numbers for these columns (published ones exist for the 15 benchmark "
                     "datasets, matched by registered format, and the top1 metric)")
    return notes
