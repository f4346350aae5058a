"""Folder-per-class formats: the ImageNet family (wnid or numeric folders) and a plain ImageFolder.

Labels of the ImageNet family come from the shipped wnid lists, not from the folders present, so a
partial tree (a few classes copied for a test, a class missing on disk) still gets the labels and
class names of the full set:

- `imagenet`, `imagenet-sketch`: label = ImageNet index of the wnid; 1000 class names.
- `imagenet-a`, `imagenet-r`: label = position of the wnid among the set's 200 wnids (sorted, as
  torchvision's ImageFolder numbers them); names = ImageNet names at the set's indices.
- `imagenet-v2`: folders are named by ImageNet class index ("0".."999"); label = int(folder name) and
  the class names are the 1000 ImageNet names in index order, so class_names[label] is right. (The
  reference keeps ImageFolder's string-sorted labels and permutes the names instead; both pair every
  image with the same name.)
"""

from __future__ import annotations

import functools
from pathlib import Path

from difftpt_ops.core.errors import InputError, NotFoundError
from difftpt_ops.data import classnames
from difftpt_ops.data.layouts import DatasetLayout, has_images, iter_class_folders, subdirectories

NUMERIC_FOLDERS = frozenset(str(i) for i in range(1000))


INNER_FOLDERS = {"imagenet": ("val",), "imagenet-sketch": ("sketch", "images")}


def image_root_of(fmt: str, root: Path) -> Path:
    """The folder holding the class folders: ImageNet's `val/`, ImageNet-Sketch's `sketch/` (the archive's) or
    `images/` (some TPT forks' layout) if present."""
    for inner in INNER_FOLDERS.get(fmt, ()):
        if (root / inner).is_dir():
            return root / inner
    return root


def _check_folders(fmt: str, root: Path, folders: list[str], labels: dict[str, int]) -> None:
    if not folders:
        raise InputError("--root", root, f"no class folders found for --format {fmt}")
    unknown = [name for name in folders if name not in labels]
    if unknown:
        raise InputError("--root", root, f"folder {unknown[0]!r} is not a class of {fmt} "
                         f"({len(unknown)} unknown folders); check --format")


def _layout(fmt: str, root: Path, names: tuple[str, ...], labels: dict[str, int], *,
            follow_outside_links: bool) -> DatasetLayout:
    image_root = image_root_of(fmt, root)
    folders = subdirectories(image_root)
    _check_folders(fmt, root, folders, labels)
    present = {name: labels[name] for name in folders}
    entries = functools.partial(iter_class_folders, root, image_root, present,
                                follow_outside_links=follow_outside_links)
    return DatasetLayout(format=fmt, root=root, class_names=names, iter_entries=entries,
                         follow_outside_links=follow_outside_links)


def imagenet_layout(fmt: str, root: Path, *, follow_outside_links: bool = False) -> DatasetLayout:
    """ImageNet val or ImageNet-Sketch: 1000 wnid folders, labels = ImageNet indices."""
    return _layout(fmt, root, classnames.imagenet_names(), classnames.imagenet_index_of_wnid(),
                   follow_outside_links=follow_outside_links)


def imagenet_subset_layout(fmt: str, root: Path, *, follow_outside_links: bool = False) -> DatasetLayout:
    """ImageNet-A or ImageNet-R: 200 wnid folders, labels = positions among the set's sorted wnids."""
    variant = {"imagenet-a": "a", "imagenet-r": "r"}[fmt]
    labels = {wnid: label for label, wnid in enumerate(classnames.subset_wnids(variant))}
    return _layout(fmt, root, classnames.subset_names(variant), labels, follow_outside_links=follow_outside_links)


def imagenet_v2_layout(fmt: str, root: Path, *, follow_outside_links: bool = False) -> DatasetLayout:
    """ImageNet-V2 with numeric folders: label = the folder's ImageNet class index."""
    labels = {name: int(name) for name in NUMERIC_FOLDERS}
    return _layout(fmt, root, classnames.imagenet_names(), labels, follow_outside_links=follow_outside_links)


def read_class_names(path: Path) -> tuple[str, ...]:
    """One class name per line; blank lines and surrounding spaces are ignored."""
    if not path.is_file():
        raise NotFoundError("--class-names", path, "file does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError("--class-names", path, f"cannot read ({exc})") from exc
    return tuple(line.strip() for line in lines if line.strip())


def imagefolder_layout(root: Path, class_names_file: Path | None = None, *,
                       follow_outside_links: bool = False) -> DatasetLayout:
    """A plain ImageFolder: sorted folder names are the classes (or the names in `class_names_file`).

    A folder without images is not a class (as torchvision's ImageFolder refuses it): it gets no label and
    no name, and the layout lists it in `empty_folders` for the registration report. `class_names_file`
    names every folder in sorted order, empty ones included; their names are dropped with them.
    """
    folders = subdirectories(root)
    if not folders:
        raise InputError("--root", root, "no class folders found (an ImageFolder has one folder per class)")
    names = tuple(folders)
    if class_names_file is not None:
        names = read_class_names(class_names_file)
        if len(names) != len(folders):
            raise InputError("--class-names", class_names_file,
                             f"has {len(names)} names but {root} has {len(folders)} class folders")
    kept = {i for i, folder in enumerate(folders)
            if has_images(root, root / folder, follow_outside_links=follow_outside_links)}
    if not kept:
        raise InputError("--root", root, f"none of its {len(folders)} class folders holds an image")
    labels = {folders[i]: label for label, i in enumerate(sorted(kept))}
    entries = functools.partial(iter_class_folders, root, root, labels, follow_outside_links=follow_outside_links)
    return DatasetLayout(format="imagefolder", root=root, class_names=tuple(names[i] for i in sorted(kept)),
                         iter_entries=entries, follow_outside_links=follow_outside_links,
                         empty_folders=tuple(f for i, f in enumerate(folders) if i not in kept))
