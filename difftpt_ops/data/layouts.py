"""What every dataset format produces: class names and a stream of (relative path, label) entries.

Datasets stay inside their roots. A symbolic link (to a file or a folder) is followed when it leads to a
place inside the dataset root; one leading outside is followed only with `follow_outside_links` (the
CLI's `--follow-outside-links`), and otherwise becomes a failed sample saying so. A folder link that
leads back to one of its own parent folders (a loop) and a folder that cannot be listed also become
failed samples with the reason: nothing under a root is skipped silently. Split-file entries must be
relative paths that stay inside the root (`splits.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from difftpt_ops.core.errors import InputError
from difftpt_ops.data.images import IMAGE_SUFFIXES


class Entry(NamedTuple):
    """One test sample as a format lists it: path relative to the dataset root (with `/`) and label."""

    relpath: str
    label: int


class FailedEntry(Entry):
    """An entry the listing already knows cannot be read (an unlistable folder, a link loop, a link leading
    outside the root): the scan records it as failed with `error`, without opening anything."""

    error: str

    def __new__(cls, relpath: str, label: int, error: str) -> FailedEntry:
        entry = super().__new__(cls, relpath, label)
        entry.error = error
        return entry


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
    follow_outside_links: bool = False  # see the module docstring
    empty_folders: tuple[str, ...] = ()  # class folders without images, not registered as classes

    def __iter__(self) -> Iterator[Entry]:
        return self.iter_entries()

    def count(self) -> int:
        """Number of entries (a listing pass; no file is opened)."""
        return sum(1 for _ in self.iter_entries())


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def subdirectories(directory: Path) -> list[str]:
    """Names of the visible subdirectories of `directory`, sorted as strings (as ImageFolder sorts).

    Raises:
        InputError: the folder holding the classes cannot be listed (nothing could be registered).
    """
    try:
        with os.scandir(directory) as scan:
            return sorted(e.name for e in scan if not is_hidden(e.name) and e.is_dir())
    except OSError as exc:
        raise InputError("--root", directory, f"cannot list it ({exc.__class__.__name__}: "
                                              f"{exc.strerror or exc})") from exc


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


OUTSIDE_HINT = "--follow-outside-links allows it"


def is_inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every link resolved, lies inside `root` (itself resolved)."""
    return path.resolve().is_relative_to(root.resolve())


def walk_images(root: Path, folder: Path, *, follow_outside_links: bool = False) -> Iterator[tuple[str, str | None]]:
    """Image files under `folder` (recursively, sorted), as (path relative to `root` with `/`, error or None).

    An error is yielded for a folder that cannot be listed, a folder link that loops back to one of its
    parents, and (unless `follow_outside_links`) a folder link leading outside `root`.
    """
    real_root, real = root.resolve(), folder.resolve()
    if not follow_outside_links and not real.is_relative_to(real_root):
        yield _relative(root, folder), f"folder link leading outside the dataset root (to {real}); {OUTSIDE_HINT}"
        return
    # The folders from the root down to `folder`: a link back to any of them is a loop.
    ancestors = (real_root, *(p.resolve() for p in reversed(folder.parents) if p.is_relative_to(root) and p != root))
    yield from _walk(real_root, root, folder, (*ancestors, real), follow_outside_links)


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _walk(real_root: Path, root: Path, folder: Path, chain: tuple[Path, ...],
          follow_outside: bool) -> Iterator[tuple[str, str | None]]:
    try:
        with os.scandir(folder) as scan:
            children = [(e.name, e.is_dir()) for e in scan if not is_hidden(e.name)]
    except OSError as exc:
        yield _relative(root, folder), f"cannot list folder ({exc.__class__.__name__}: {exc.strerror or exc})"
        return
    # A folder's own files first, then its subfolders, each sorted: the order os.walk gave earlier versions,
    # so the fingerprints of datasets registered before stay the same.
    for name in sorted(name for name, is_dir in children if not is_dir and is_image_name(name)):
        yield _relative(root, folder / name), None
    for name in sorted(name for name, is_dir in children if is_dir):
        path = folder / name
        real = path.resolve()
        if real in chain:
            yield _relative(root, path), f"symbolic link loop: this folder leads back to {real}"
        elif not follow_outside and not real.is_relative_to(real_root):
            yield _relative(root, path), f"folder link leading outside the dataset root (to {real}); {OUTSIDE_HINT}"
        else:
            yield from _walk(real_root, root, path, (*chain, real), follow_outside)


def has_images(root: Path, folder: Path, *, follow_outside_links: bool = False) -> bool:
    """Whether `folder` lists at least one image or unreadable entry (a listing pass, stopped at the first)."""
    return next(walk_images(root, folder, follow_outside_links=follow_outside_links), None) is not None


def iter_class_folders(root: Path, image_root: Path, labels: dict[str, int], *,
                       follow_outside_links: bool = False) -> Iterator[Entry]:
    """Entries of an ImageFolder-style tree: folder name -> label via `labels`, folders in name order."""
    for folder in sorted(labels):
        label = labels[folder]
        for relpath, error in walk_images(root, image_root / folder, follow_outside_links=follow_outside_links):
            yield Entry(relpath, label) if error is None else FailedEntry(relpath, label, error)
