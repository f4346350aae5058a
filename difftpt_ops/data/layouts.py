"""What every dataset format produces: class names and a stream of (relative path, label) entries."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from difftpt_ops.data.images import IMAGE_SUFFIXES


class Entry(NamedTuple):
    """One test sample as a format lists it: path relative to the dataset root (with `/`) and label."""

    relpath: str
    label: int


@dataclass(frozen=True)
class DatasetLayout:
    """A dataset on disk, read through one format.

    `class_names[label]` is the name the reference prompts with for that label. Entries stream in a
    fixed order (the order of the format's own listing), so two scans of the same tree agree.
    """

    format: str
    root: Path
    class_names: tuple[str, ...]
    iter_entries: Callable[[], Iterator[Entry]] = field(repr=False, compare=False)
    split_file: Path | None = None

    def __iter__(self) -> Iterator[Entry]:
        return self.iter_entries()

    def count(self) -> int:
        """Number of entries (a listing pass; no file is opened)."""
        return sum(1 for _ in self.iter_entries())


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def subdirectories(directory: Path) -> list[str]:
    """Names of the visible subdirectories of `directory`, sorted as strings (as ImageFolder sorts)."""
    with os.scandir(directory) as scan:
        return sorted(e.name for e in scan if not is_hidden(e.name) and e.is_dir())


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def walk_images(root: Path, folder: Path) -> Iterator[str]:
    """Image files under `folder` (recursively, sorted), as paths relative to `root` with `/`."""
    for current, dirnames, filenames in os.walk(folder, followlinks=True):
        # Sorting in place fixes the walk order, so every scan lists the same sequence.
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        rel_dir = Path(current).relative_to(root).as_posix()
        for name in sorted(filenames):
            if is_image_name(name):
                yield name if rel_dir == "." else f"{rel_dir}/{name}"


def iter_class_folders(root: Path, image_root: Path, labels: dict[str, int]) -> Iterator[Entry]:
    """Entries of an ImageFolder-style tree: folder name -> label via `labels`, folders in name order."""
    for folder in sorted(labels):
        label = labels[folder]
        for relpath in walk_images(root, image_root / folder):
            yield Entry(relpath, label)
