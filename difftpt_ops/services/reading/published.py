"""Published numbers in the table: the shipped `data/published.json`, as rows of their own with ours minus
published below our row. They never enter our averages.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from difftpt_ops.services.reading.table_model import BACKBONES, Cell, Row, Table, TableQuery, row_averages


def load_published() -> dict[str, Any]:
    """The shipped published numbers (difftpt_ops/data/published.json)."""
    with resources.files("difftpt_ops.data").joinpath("published.json").open(encoding="utf-8") as handle:
        return json.load(handle)


def published_backbone_for(model: str | None) -> str:
    """The papers' name of our model (ViT-B-16 -> ViT-B/16, RN50 -> RN50); ViT-B/16 for anything else."""
    return BACKBONES.get((model or "").strip().lower(), "ViT-B/16")


def published_entries(backbone: str) -> dict[str, dict[str, Any]]:
    """Per method: the union of its published numbers for `backbone` ({format: percent}) and their sources."""
    merged: dict[str, dict[str, Any]] = {}
    for entry in load_published()["entries"]:
        if entry["backbone"] != backbone:
            continue
        item = merged.setdefault(entry["method"], {"values": {}, "sources": []})
        item["values"].update({f: v for f, v in entry["values"].items() if v is not None})
        item["sources"].append(entry["source"])
    return merged


def add_published(table: Table, query: TableQuery) -> None:
    """A published row per method with a number for a column, and ours minus published under our row at the
    method's defaults; a method with no such row (only other configurations) gets its published row alone."""
    backbone = query.published_backbone or published_backbone_for(table.model)
    entries = published_entries(backbone)
    rows: list[Row] = []
    for row in table.rows:
        rows.append(row)
        published = _published_row(row.method, entries.get(row.method), backbone, table)
        if published is not None and row.label == row.method:
            rows.extend([published, _difference_row(row, published, table)])
    shown = {r.method for r in table.rows if r.label == r.method}  # methods with a row at their defaults
    for method, entry in entries.items():
        published = None if method in shown else _published_row(method, entry, backbone, table)
        if published is not None:
            rows.append(published)
    table.rows = rows


def _published_row(method: str, entry: dict[str, Any] | None, backbone: str, table: Table) -> Row | None:
    """Values of `entry` for the table's columns (fractions, like ours); None when it has none of them."""
    if entry is None or table.metric != "top1":
        return None
    cells = {d: Cell(dataset=d, value=entry["values"][table.formats[d]] / 100.0)
             for d in table.columns if entry["values"].get(table.formats[d]) is not None}
    if not cells:
        return None
    values = {d: c.value for d, c in cells.items()}
    return Row(label=f"{method} (published, {backbone})", method=method, kind="published", cells=cells,
               averages=row_averages(values, table), source="; ".join(entry["sources"]))


def _difference_row(ours: Row, published: Row, table: Table) -> Row:
    cells: dict[str, Cell] = {}
    for dataset, cell in ours.cells.items():
        theirs = published.cells.get(dataset)
        if cell.value is not None and theirs is not None and theirs.value is not None:
            cell.published_diff = cell.value - theirs.value
            cells[dataset] = Cell(dataset=dataset, value=cell.published_diff)
    averages = {name: (ours.averages.get(name) - published.averages[name])  # type: ignore[operator]
                if ours.averages.get(name) is not None and published.averages.get(name) is not None else None
                for name in table.average_columns}
    return Row(label=f"{ours.method} - published", method=ours.method, kind="difference", cells=cells,
               averages=averages)
