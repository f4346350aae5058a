"""Rendering a paper table (`reading.table` builds it): the terminal's header and cells, Markdown, LaTeX,
CSV, a heatmap, the files `table --out` writes, and the MLflow run `table --log` fills."""

from __future__ import annotations

import json
import math
from typing import Any

from difftpt_ops.core.errors import InputError
from difftpt_ops.core.secrets import mask_url
from difftpt_ops.services.reading.table_model import Cell, Table


def header(table: Table) -> list[str]:
    """Column keys: method, the datasets, the averages."""
    return ["method", *table.columns, *table.average_columns]


def column_sizes(table: Table) -> dict[str, int]:
    """Per dataset: the largest sample count of our cells (shown in the header; smaller ones in their cell)."""
    sizes: dict[str, int] = {}
    for row in table.rows:
        if row.kind == "ours":
            for dataset, cell in row.cells.items():
                sizes[dataset] = max(sizes.get(dataset, 0), cell.n)
    return sizes


def display_header(table: Table) -> list[str]:
    """The header as printed: each dataset with its number of samples, `imagenet-a (n=1000)`."""
    sizes = column_sizes(table)
    return ["method", *(f"{d} (n={sizes[d]})" if sizes.get(d) else d for d in table.columns),
            *table.average_columns]


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def cell_text(cell: Cell | None, kind: str) -> str:
    """A cell as text: value, ± std, significance and subset marks; '–' when missing (never 0)."""
    if cell is None or cell.value is None:
        return "–"
    if kind == "difference":
        return _pct(cell.value, signed=True)
    text_value = _pct(cell.value)
    if cell.std is not None:
        text_value += f" ±{100 * cell.std:.2f}"
    if cell.significant:
        text_value += "*"
    if cell.subset:
        text_value += "†"
    if cell.other_samples:
        text_value += "‡"
    return text_value


def row_texts(table: Table) -> list[list[str]]:
    """Every row as printed; a cell on fewer samples than its column's header says how many."""
    sizes, out = column_sizes(table), []
    for row in table.rows:
        signed = row.kind == "difference"
        cells = []
        for dataset in table.columns:
            cell = row.cells.get(dataset)
            text_value = cell_text(cell, row.kind)
            if row.kind == "ours" and cell is not None and cell.value is not None and cell.n < sizes.get(dataset, 0):
                text_value += f" (n={cell.n})"
            cells.append(text_value)
        out.append([row.label, *cells, *(_pct(row.averages.get(a), signed) for a in table.average_columns)])
    return out


def to_markdown(table: Table) -> str:
    """A GitHub Markdown table (published rows in italics), then the notes."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(display_header(table)), "|" + "|".join([" --- "] + [" ---: "] * (len(header(table)) - 1)) + "|"]
    for row, texts in zip(table.rows, row_texts(table), strict=True):
        lines.append(line([f"*{texts[0]}*", *texts[1:]] if row.kind != "ours" else texts))
    return "\n".join(lines + [""] + [f"{note}  " for note in table.notes]).rstrip() + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "–": "--"}


def latex_escape(value: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in value)


def to_latex(table: Table) -> str:
    """A booktabs tabular (published rows in italics); the notes as comments."""
    columns = display_header(table)
    lines = [r"\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in columns) + r" \\", r"\midrule"]
    for row, texts in zip(table.rows, row_texts(table), strict=True):
        cells = [latex_escape(t) for t in texts]
        if row.kind != "ours":
            cells = [r"\textit{" + c + "}" for c in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"] + [f"% {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("row", "kind", "method", "column", "value", "std", "n", "runs", "subset", "other_samples",
               "paired_n", "p", "p_holm", "significant", "published_diff", "source")


def csv_rows(table: Table) -> list[list[Any]]:
    """Long format: one line per row and column (averages included), values as fractions."""
    out: list[list[Any]] = []
    for row in table.rows:
        for dataset in table.columns:
            cell = row.cells.get(dataset)
            if cell is None:
                out.append([row.label, row.kind, row.method, dataset, *[""] * 11, row.source or ""])
                continue
            out.append([row.label, row.kind, row.method, dataset, _num(cell.value), _num(cell.std),
                        cell.n or "", " ".join(map(str, cell.runs)), cell.subset, cell.other_samples,
                        "" if cell.paired_n is None else cell.paired_n, _num(cell.p), _num(cell.p_holm),
                        cell.significant, _num(cell.published_diff), row.source or ""])
        for name in table.average_columns:
            out.append([row.label, row.kind, row.method, name, _num(row.averages.get(name)), *[""] * 10,
                        row.source or ""])
    return out


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def render_heatmap(table: Table, path: Any) -> Any:
    """PNG heatmap of our rows' values (percent), each cell annotated with its difference to the baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ours = [r for r in table.rows if r.kind == "ours"]
    columns = [*table.columns, *table.average_columns]
    base = next((r for r in ours if r.label == table.baseline_row), None)
    matrix, labels = [], []
    for row in ours:
        values, notes = [], []
        for column in columns:
            value = row.cells[column].value if column in row.cells else row.averages.get(column)
            ref = (base.cells[column].value if column in base.cells else base.averages.get(column)) if base else None
            values.append(float("nan") if value is None else 100 * value)
            notes.append("–" if value is None else f"{100 * value:.1f}" + (
                f"\n{100 * (value - ref):+.1f}" if ref is not None and row is not base else ""))
        matrix.append(values)
        labels.append(notes)
    figure = Figure(figsize=(max(4.0, 1.1 * len(columns) + 2), max(2.5, 0.6 * len(ours) + 1.5)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(matrix or [[float("nan")]], cmap="viridis", aspect="auto")
    for i, notes in enumerate(labels):
        for j, note in enumerate(notes):
            axes.text(j, i, note, ha="center", va="center", fontsize=7, color="white")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(ours)), [r.label for r in ours], fontsize=8)
    axes.set_title(f"{table.metric} (%), difference to {table.baseline_row or 'no baseline'} below", fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path)
    return path


# --- MLflow ----------------------------------------------------------------------------------------------------------

TABLE_EXPERIMENT = "difftpt-tables"


def write_table_files(table: Table, directory: Any) -> list[str]:
    """table.md, table.csv, table.json and table_heatmap.png in `directory`; returns the names."""
    import csv
    from pathlib import Path

    directory = Path(directory)
    (directory / "table.md").write_text(to_markdown(table), encoding="utf-8")
    with (directory / "table.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_rows(table))
    (directory / "table.json").write_text(json.dumps(table.to_dict(), indent=1, default=str), encoding="utf-8")
    render_heatmap(table, directory / "table_heatmap.png")
    return ["table.md", "table.csv", "table.json", "table_heatmap.png"]


def log_table(settings: Any, table: Table) -> dict[str, Any]:
    """Log the table's files as artifacts of one MLflow run named after its query (the same run on repeats).

    Raises:
        InputError: tracking is turned off.
        ServiceUnavailableError: MLflow cannot be reached.
    """
    import tempfile
    from pathlib import Path

    from difftpt_ops.core.errors import ServiceUnavailableError
    from difftpt_ops.services.reading.reporting import tracker_for, tracking_enabled

    if not tracking_enabled(settings):
        raise InputError("--log", True, "MLflow tracking is off (DIFFTPT_OPS_MLFLOW_TRACKING_URI=none)")
    tracker = tracker_for(settings)
    runs = sorted({run for row in table.rows for cell in row.cells.values() for run in cell.runs})
    tags = {"difftpt.kind": "table", "difftpt.table.query": table.query.name(), "difftpt.model": table.model or "",
            "difftpt.table.runs": ",".join(map(str, runs))[:5000]}
    try:
        experiment_id = tracker.ensure_experiment(TABLE_EXPERIMENT)
        snapshot = tracker.find_run(experiment_id, table.query.fingerprint())
        run_id = snapshot.run_id if snapshot else tracker.create_run(
            experiment_id, table.query.name(), {"difftpt.fingerprint": table.query.fingerprint(), **tags})
        tracker.set_tags(run_id, tags)
        with tempfile.TemporaryDirectory(prefix="difftpt-table-") as tmp:
            names = write_table_files(table, Path(tmp))
            tracker.log_artifacts(run_id, Path(tmp))
        tracker.set_terminated(run_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001  any MLflow failure is one line for the user
        raise ServiceUnavailableError(f"MLflow at {mask_url(settings.mlflow_tracking_uri)} failed while logging "
                                      f"the table ({type(exc).__name__}: "
                                      f"{mask_url(str(exc).splitlines()[0][:200])})") from exc
    return {"mlflow_run_id": run_id, "experiment": TABLE_EXPERIMENT, "run_name": table.query.name(),
            "artifacts": names}
