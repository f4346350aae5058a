"""PNG figures for MLflow artifacts: reliability diagram, per-class gain, DiffTPT view grid.

Uses matplotlib's object API on the Agg canvas (no pyplot): no GUI backend, no global figure state,
safe in worker processes and threads. Inputs are plain data, not database rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAX_CLASS_TICKS = 40  # beyond this, per-class tick labels are unreadable: sorted bars only


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def reliability_diagram(bins: Sequence[dict[str, float]], ece: float | None, path: Path, title: str) -> Path:
    """Accuracy per confidence bin against the diagonal; bins are {count, accuracy, mean_confidence}."""
    figure = _new_figure(5, 5)
    axes = figure.add_subplot(1, 1, 1)
    width = 1.0 / max(1, len(bins))
    centres = [(i + 0.5) * width for i in range(len(bins))]
    axes.bar(centres, [b["accuracy"] if b["count"] else 0.0 for b in bins], width=width * 0.95,
             color="#4c72b0", edgecolor="black", linewidth=0.5, label="accuracy")
    axes.bar(centres, [(b["mean_confidence"] - b["accuracy"]) if b["count"] else 0.0 for b in bins],
             bottom=[b["accuracy"] if b["count"] else 0.0 for b in bins], width=width * 0.95,
             color="#dd8452", alpha=0.4, label="gap to confidence")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (after adaptation)")
    axes.set_ylabel("accuracy")
    ece_text = "n/a" if ece is None else f"{ece:.4f}"
    axes.set_title(f"{title}\nECE ({len(bins)} bins) = {ece_text}", fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def per_class_gain(classes: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Top-1 gain over zero-shot per class, sorted; classes are {name, gain} (gain may be None)."""
    items = sorted(((c.get("name") or str(c.get("label")), c["gain"]) for c in classes if c.get("gain") is not None),
                   key=lambda item: item[1])
    figure = _new_figure(max(6.0, min(12.0, 0.3 * len(items))), 4.5)
    axes = figure.add_subplot(1, 1, 1)
    if len(items) > _MAX_CLASS_TICKS:
        # Two filled areas instead of one bar artist per class: 1000 bars take seconds to draw.
        values = [100 * gain for _, gain in items]
        xs = list(range(len(values)))
        axes.fill_between(xs, values, 0, where=[v < 0 for v in values], color="#c44e52", step="mid")
        axes.fill_between(xs, values, 0, where=[v >= 0 for v in values], color="#55a868", step="mid")
        axes.set_xlim(-0.5, len(values) - 0.5)
        axes.set_xlabel(f"{len(items)} classes, sorted by gain")
    elif items:
        values = [100 * gain for _, gain in items]
        axes.bar(range(len(values)), values, color=["#c44e52" if v < 0 else "#55a868" for v in values], width=0.9)
        axes.set_xticks(range(len(items)))
        axes.set_xticklabels([name for name, _ in items], rotation=90, fontsize=7)
    else:
        axes.text(0.5, 0.5, "no zero-shot predictions to compare with", ha="center", va="center")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel("top-1 gain over zero-shot (points)")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return path


@dataclass(frozen=True)
class GridVariant:
    """One generated variation: its file (None if missing), cosine score and whether the filter kept it."""

    image: Path | None
    cosine: float | None
    kept: bool | None


@dataclass(frozen=True)
class GridRow:
    """A test image, a caption (label/prediction), and its generated variations in variant order."""

    image: Path | None
    caption: str
    variants: Sequence[GridVariant]


_CELL = 96  # thumbnail size in the view grid, pixels
_BORDER = 4
_CAPTION = 30  # room above each thumbnail for its two caption lines
_KEPT, _DROPPED, _PLAIN = (44, 160, 44), (214, 39, 40), (120, 120, 120)


def _thumbnail(image: Path | None) -> Any:
    """The image as a _CELL x _CELL RGB array, or a light grey square when it is missing or unreadable."""
    import numpy as np
    from PIL import Image

    if image is not None and Path(image).is_file():
        try:
            with Image.open(image) as handle:
                handle.draft("RGB", (_CELL, _CELL))  # JPEG: decode at reduced size
                return np.asarray(handle.convert("RGB").resize((_CELL, _CELL)))
        except OSError:
            pass
    return np.full((_CELL, _CELL, 3), 230, dtype=np.uint8)


def view_grid(rows: Sequence[GridRow], path: Path, title: str) -> Path:
    """Each test image beside its generated variations, each marked with cosine and kept (green) or dropped (red).

    The thumbnails are pasted into one array and drawn as a single image (one axes with a few text
    labels), which is ten times faster than a subplot per thumbnail.
    """
    import numpy as np

    columns = 1 + max((len(r.variants) for r in rows), default=0)
    step_x, step_y = _CELL + 2 * _BORDER + 8, _CELL + 2 * _BORDER + _CAPTION
    mosaic = np.full((max(1, len(rows)) * step_y, columns * step_x, 3), 255, dtype=np.uint8)
    labels: list[tuple[float, float, str, tuple[int, int, int]]] = []
    for r, row in enumerate(rows):
        cells = [(row.image, _PLAIN, row.caption)] + [
            (v.image, _KEPT if v.kept else (_DROPPED if v.kept is not None else _PLAIN),
             ("cos n/a" if v.cosine is None else f"cos {v.cosine:.3f}") + "\n"
             + ("kept" if v.kept else ("dropped" if v.kept is not None else "no score"))) for v in row.variants]
        for c, (image, colour, caption) in enumerate(cells):
            top, left = r * step_y + _CAPTION, c * step_x + 4
            mosaic[top:top + _CELL + 2 * _BORDER, left:left + _CELL + 2 * _BORDER] = colour
            mosaic[top + _BORDER:top + _BORDER + _CELL, left + _BORDER:left + _BORDER + _CELL] = _thumbnail(image)
            labels.append((left + _BORDER + _CELL / 2, top - 2, caption, colour))
    dpi = 100
    figure = _new_figure(mosaic.shape[1] / dpi, mosaic.shape[0] / dpi + 0.4)
    axes = figure.add_axes((0, 0, 1, mosaic.shape[0] / (mosaic.shape[0] + 0.4 * dpi)))
    axes.imshow(mosaic, interpolation="nearest")
    axes.set_axis_off()
    for x, y, caption, colour in labels:
        axes.text(x, y, caption, ha="center", va="bottom", fontsize=6.5, color=[v / 255 for v in colour])
    figure.suptitle(title, fontsize=9, y=0.995, va="top")
    figure.savefig(path, dpi=dpi)
    return path
