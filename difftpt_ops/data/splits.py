"""The cross-domain sets: CoOp's `split_zhou_*.json` test lists, and FGVC Aircraft's own files.

A split file's "test" entries are [path, label, classname]; the path is relative to CoOp's image
folder (`jpg/` for Flowers, `images/` for DTD, Pets and Food101, `101_ObjectCategories/`, ...). The root
may be the dataset folder holding that image folder or the image folder itself; whichever holds the
listed files is used, and stored paths are relative to the root. Class names come from the shipped
list in label order (the reference's names), not from the split file.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from difftpt_ops.core.errors import InputError, NotFoundError
from difftpt_ops.data import classnames
from difftpt_ops.data.layouts import DatasetLayout, Entry

SPLIT_FILES: dict[str, str] = {
    "flower102": "split_zhou_OxfordFlowers.json",
    "dtd": "split_zhou_DescribableTextures.json",
    "pets": "split_zhou_OxfordPets.json",
    "cars": "split_zhou_StanfordCars.json",
    "ucf101": "split_zhou_UCF101.json",
    "caltech101": "split_zhou_Caltech101.json",
    "food101": "split_zhou_Food101.json",
    "sun397": "split_zhou_SUN397.json",
    "eurosat": "split_zhou_EuroSAT.json",
}
FORMAT_OF_SPLIT_FILE = {file_name: fmt for fmt, file_name in SPLIT_FILES.items()}
# CoOp's image folder inside each dataset folder; the root itself is always tried last.
_IMAGE_DIRS: dict[str, tuple[str, ...]] = {
    "flower102": ("jpg",),
    "dtd": ("images",),
    "pets": ("images",),
    "cars": (),
    "ucf101": ("UCF-101-midframes",),
    "caltech101": ("101_ObjectCategories",),
    "food101": ("images",),
    "sun397": ("SUN397",),
    "eurosat": ("2750",),
}
_PROBE = 20  # split entries tried when looking for the image folder


def find_split_file(fmt: str, root: Path, split_file: Path | None) -> Path:
    """The split file: `split_file` if given, else CoOp's file name in the root or its parent."""
    if split_file is not None:
        if not split_file.is_file():
            raise NotFoundError("--split-file", split_file, "file does not exist")
        other = FORMAT_OF_SPLIT_FILE.get(split_file.name)
        if other is not None and other != fmt:
            # Its labels index another set's classes: read with this format's names, every label would be wrong.
            raise InputError("--split-file", split_file, f"is CoOp's split file of {other}, not of {fmt}")
        return split_file
    name = SPLIT_FILES[fmt]
    for folder in (root, root.parent):
        if (folder / name).is_file():
            return folder / name
    raise NotFoundError("--split-file", name, f"not found in {root} or its parent; pass --split-file PATH")


def read_test_entries(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """The split's "test" list as (path, label), checked against the number of classes."""
    try:
        payload: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError("--split-file", path, f"not a readable JSON file ({exc})") from exc
    test = payload.get("test") if isinstance(payload, dict) else None
    if not isinstance(test, list) or not test:
        raise InputError("--split-file", path, "has no non-empty 'test' list")
    entries: list[tuple[str, int]] = []
    for position, item in enumerate(test):
        if not (isinstance(item, list) and len(item) >= 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and 0 <= item[1] < num_classes):
            raise InputError("--split-file", path, f"test entry {position} is not [path, label 0..{num_classes - 1}, "
                             f"classname]: {item!r}")
        check_relative(item[0], "--split-file", path, f"test entry {position}")
        entries.append((item[0], item[1]))
    return entries


def check_relative(relpath: str, argument: str, value: object, where: str) -> None:
    """Refuse a listed path that is absolute or climbs out of the dataset root with `..`."""
    parts = relpath.replace("\\", "/").split("/")
    if relpath.startswith(("/", "\\")) or (len(relpath) > 1 and relpath[1] == ":") or ".." in parts:
        raise InputError(argument, value, f"{where} leaves the dataset root: {relpath!r} (paths must be relative, "
                                          "without '..')")


def _image_prefix(fmt: str, root: Path, entries: list[tuple[str, int]], split_file: Path) -> str:
    """The folder under the root that holds the split's files ("" for the root itself)."""
    probe = [relpath for relpath, _ in entries[:_PROBE]]
    for prefix in (*_IMAGE_DIRS[fmt], ""):
        folder = root / prefix if prefix else root
        if any((folder / relpath).is_file() for relpath in probe):
            return prefix
    tried = ", ".join([*(str(root / p) for p in _IMAGE_DIRS[fmt]), str(root)])
    raise InputError("--root", root, f"the images listed in {split_file.name} are not under it (tried {tried})")


def _iter_split(prefix: str, entries: list[tuple[str, int]]) -> Iterator[Entry]:
    for relpath, label in entries:
        yield Entry(f"{prefix}/{relpath}" if prefix else relpath, label)


def split_layout(fmt: str, root: Path, split_file: Path | None = None, *,
                 follow_outside_links: bool = False) -> DatasetLayout:
    """One of the nine CoOp split sets (`flower102`, `dtd`, `pets`, ...)."""
    names = classnames.cross_domain_names(fmt)
    path = find_split_file(fmt, root, split_file)
    entries = read_test_entries(path, len(names))
    prefix = _image_prefix(fmt, root, entries, path)
    return DatasetLayout(format=fmt, root=root, class_names=names, split_file=path,
                         iter_entries=functools.partial(_iter_split, prefix, entries),
                         follow_outside_links=follow_outside_links)


def aircraft_dir(root: Path) -> Path | None:
    """The folder holding FGVC Aircraft's lists: the root, or `data/` as in the original archive."""
    for folder in (root, root / "data"):
        if (folder / "variants.txt").is_file() and (folder / "images_variant_test.txt").is_file():
            return folder
    return None


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError("--root", path, f"cannot read ({exc})") from exc


def _aircraft_entries(folder: Path, variants: list[str]) -> list[tuple[str, int]]:
    label_of = {name: label for label, name in enumerate(variants)}
    entries: list[tuple[str, int]] = []
    for number, line in enumerate(_read_lines(folder / "images_variant_test.txt"), start=1):
        image_id, _, variant = line.partition(" ")
        check_relative(image_id, "--root", folder / "images_variant_test.txt", f"line {number}")
        if variant.strip() not in label_of:
            raise InputError("--root", folder / "images_variant_test.txt",
                             f"line {number}: variant {variant.strip()!r} is not in variants.txt")
        entries.append((f"images/{image_id}.jpg", label_of[variant.strip()]))
    return entries


def aircraft_layout(root: Path, *, follow_outside_links: bool = False) -> DatasetLayout:
    """FGVC Aircraft: label = row of the image's variant in variants.txt; names = the reference's list."""
    folder = aircraft_dir(root)
    if folder is None:
        raise InputError("--root", root, "not an FGVC Aircraft folder (variants.txt and images_variant_test.txt "
                         "missing)")
    names = classnames.cross_domain_names("aircraft")
    variants = _read_lines(folder / "variants.txt")
    # Labels come from variants.txt and prompts from the shipped names: they must be the same list.
    if variants != list(names):
        raise InputError("--root", folder / "variants.txt",
                         f"lists {len(variants)} variants that differ from the {len(names)} FGVC Aircraft classes")
    entries = _aircraft_entries(folder, variants)
    prefix = "" if folder == root else folder.relative_to(root).as_posix()
    return DatasetLayout(format="aircraft", root=root, class_names=names,
                         iter_entries=functools.partial(_iter_split, prefix, entries),
                         follow_outside_links=follow_outside_links)
