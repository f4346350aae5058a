"""The experiment table's data: what a table query asks, the runs it reads, its cells, rows and averages.

`table` builds it (services.reading.table), `published` adds the published rows, `table_render` prints it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from difftpt_ops.core.errors import InputError
from difftpt_ops.core.specs import fingerprint_of
from difftpt_ops.data.formats import CROSS_DOMAIN_FORMATS, IMAGENET_FORMATS
from difftpt_ops.services.reading.stats import ECE_BINS, check_ece_bins

METRICS = ("top1", "top5", "ece")
FORMATS = ("rich", "markdown", "latex", "csv", "json")
# Column order of the papers (TPT, DiffTPT): ImageNet and its shifts, then the cross-domain sets.
PAPER_ORDER = ("imagenet", "imagenet-a", "imagenet-v2", "imagenet-r", "imagenet-sketch", "flower102", "dtd",
               "pets", "cars", "ucf101", "caltech101", "food101", "sun397", "aircraft", "eurosat")
AVERAGES = (
    ("avg ImageNet+4", IMAGENET_FORMATS),
    ("avg 4 shifts", tuple(f for f in IMAGENET_FORMATS if f != "imagenet")),
    ("avg cross-domain", CROSS_DOMAIN_FORMATS),
)
# Our open_clip model names -> the backbone names the papers report.
BACKBONES = {"vit-b-16": "ViT-B/16", "vit-b/16": "ViT-B/16", "rn50": "RN50"}


@dataclass(frozen=True)
class TableQuery:
    """What to tabulate. Empty selections mean everything present."""

    model: str | None = None
    methods: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    metric: str = "top1"
    baseline: str | None = None  # None: zeroshot when present
    run_ids: tuple[int, ...] = ()
    sweep_id: int | None = None
    alpha: float = 0.05
    published: bool = False
    published_backbone: str | None = None  # None: from the model name
    ece_bins: int = ECE_BINS  # with metric "ece"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InputError("--metric", self.metric, f"must be one of {', '.join(METRICS)}")
        check_ece_bins(self.ece_bins)
        if not 0.0 < self.alpha < 1.0:
            raise InputError("--alpha", self.alpha, "must be in (0, 1)")
        if self.published_backbone is not None and self.published_backbone not in set(BACKBONES.values()):
            raise InputError("--published-backbone", self.published_backbone,
                             f"must be one of {', '.join(sorted(set(BACKBONES.values())))}")

    def name(self) -> str:
        """A readable name of the query: the MLflow run of `table --log` is called this."""
        parts = [f"table {self.metric}"]
        if self.metric == "ece" and self.ece_bins != ECE_BINS:
            parts.append(f"bins={self.ece_bins}")
        for label, value in (("model", self.model), ("methods", ",".join(self.methods)),
                             ("datasets", ",".join(self.datasets)), ("baseline", self.baseline),
                             ("runs", ",".join(map(str, self.run_ids))), ("sweep", self.sweep_id)):
            if value:
                parts.append(f"{label}={value}")
        return " ".join(parts)

    def fingerprint(self) -> str:
        return fingerprint_of({"table": self.name(), "published": self.published, "alpha": self.alpha,
                               "published_backbone": self.published_backbone})


@dataclass
class RunRow:
    """A finished tuning run with what the table needs of it."""

    run_id: int
    method: str
    spec: dict[str, Any]
    num_samples: int
    version_id: int
    version_size: int
    subset_size: int | None
    dataset: str
    format: str
    generation_config: int | None = None  # DiffTPT: the generation config whose images it read
    variant: str = ""  # the sweep grid point (without the seed) when tabulating a sweep
    variant_rank: tuple[int, ...] = ()  # its place in the grid as submitted: rows follow it
    config: str = ""  # the settings apart from the method's defaults for the dataset (configurations.py)
    n: int = 0
    correct: int = 0
    top5: int = 0
    ece: float | None = None
    weights: str | None = None  # sha256 of the CLIP weights its shards recorded (None: not recorded)

    @property
    def model(self) -> str:
        return str((self.spec.get("model") or {}).get("name", ""))

    @property
    def seed(self) -> Any:
        return self.spec.get("seed")

    def value(self, metric: str) -> float | None:
        if metric == "ece":
            return self.ece
        hits = self.correct if metric == "top1" else self.top5
        return hits / self.n if self.n else None


@dataclass
class Cell:
    """One (row, dataset) cell: mean over the seed group, and the paired test of its latest run."""

    dataset: str
    value: float | None = None
    std: float | None = None
    n: int = 0
    runs: list[int] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    subset: bool = False
    other_samples: bool = False  # its samples and the baseline cell's are not the same (paired_n tells how many are)
    baseline_run: int | None = None
    paired_n: int | None = None
    p: float | None = None
    p_holm: float | None = None
    significant: bool = False
    published_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Row:
    """A row: our method (kind 'ours'), a published one ('published'), or ours minus published ('difference')."""

    label: str
    method: str
    kind: str
    cells: dict[str, Cell]
    averages: dict[str, float | None]
    source: str | None = None
    config: str = ""  # our rows: the configuration of the method (sweep rows: the grid point is in the label)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "kind": self.kind, "config": self.config,
                "source": self.source, "cells": {k: c.to_dict() for k, c in self.cells.items()},
                "averages": self.averages}


@dataclass
class Table:
    """The whole table; `columns` are dataset names in paper order, `average_columns` the averages shown."""

    query: TableQuery
    model: str | None
    metric: str
    baseline: str | None
    columns: list[str]
    formats: dict[str, str]
    average_columns: list[str]
    rows: list[Row]
    notes: list[str]
    superseded: list[tuple[int, int]] = field(default_factory=list)  # (named run, the newer run shown instead)
    other_limits: list[tuple[int, int]] = field(default_factory=list)  # (seed repeat left out, its cell's run)
    other_model: list[int] = field(default_factory=list)  # named runs of another model than the table's
    baseline_row: str | None = None  # the label of the baseline's row (`zeroshot`, or its first configuration)
    weights: dict[str, list[int]] = field(default_factory=dict)  # weights sha256 -> the shown runs computed with them

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.query.name(), "model": self.model, "metric": self.metric, "baseline": self.baseline,
                "baseline_row": self.baseline_row, "alpha": self.query.alpha, "columns": self.columns,
                "formats": self.formats, "average_columns": self.average_columns,
                "rows": [r.to_dict() for r in self.rows], "notes": self.notes, "superseded": self.superseded,
                "other_limits": self.other_limits,
                "other_model": self.other_model, "weights": self.weights}


def average_columns(formats: dict[str, str]) -> list[str]:
    present = set(formats.values())
    return [name for name, group in AVERAGES if present & set(group)]


def paper_average(values: dict[str, float | None], formats: dict[str, str], group: tuple[str, ...]) -> float | None:
    """Mean over the columns of `group`'s formats; None unless each format has exactly one column with a value."""
    members = [d for d, fmt in formats.items() if fmt in group]
    if sorted(formats[d] for d in members) != sorted(group):
        return None
    picked = [values.get(d) for d in members]
    if any(v is None for v in picked):
        return None
    return statistics.fmean(v for v in picked if v is not None)


def row_averages(values: dict[str, float | None], table: Table) -> dict[str, float | None]:
    groups = dict(AVERAGES)
    return {name: paper_average(values, table.formats, groups[name]) for name in table.average_columns}
