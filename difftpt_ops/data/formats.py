"""Dataset formats: names, auto-detection, and opening a root as a DatasetLayout.

Formats (see folders.py and splits.py for the label rules):

- ImageNet family: `imagenet` (val/<wnid>/*), `imagenet-a`, `imagenet-r` (200 wnid folders),
  `imagenet-v2` (numeric folders 0..999), `imagenet-sketch` (1000 wnid folders).
- Cross-domain: `flower102`, `dtd`, `pets`, `cars`, `ucf101`, `caltech101`, `food101`, `sun397`,
  `eurosat` (CoOp split_zhou_*.json) and `aircraft` (FGVC Aircraft's own lists).
- `imagefolder`: one folder per class, folder names as class names (or a class-name file).

`auto` detects: a split_zhou file -> that set; variants.txt -> aircraft; 200 folders that are exactly
ImageNet-R's (or ImageNet-A's) wnids -> imagenet-r (imagenet-a); 1000 numeric folders -> imagenet-v2;
1000 ImageNet wnid folders (in the root or its val/) -> imagenet (imagenet-sketch when the root or its
inner folder is named *sketch*, or they are in images/ of a root named *sketch*; 1000 wnid folders directly
in a root not named *sketch* must hold val's ILSVRC2012_val_* files, else `auto` asks); anything else ->
imagefolder. A tree with wnid or class-index folders that is not one complete set (a partial copy, a stray
folder such as __MACOSX) is refused by `auto`: name the format to read it with the full set's labels (or
`imagefolder` to use the folder names).
"""

from __future__ import annotations

from pathlib import Path

from difftpt_ops.core.errors import InputError, NotFoundError
from difftpt_ops.data import classnames, folders, splits
from difftpt_ops.data.layouts import DatasetLayout, subdirectories

IMAGENET_FORMATS = ("imagenet", "imagenet-a", "imagenet-r", "imagenet-v2", "imagenet-sketch")
SPLIT_FORMATS = tuple(splits.SPLIT_FILES)
CROSS_DOMAIN_FORMATS = (*SPLIT_FORMATS, "aircraft")
FORMATS = (*IMAGENET_FORMATS, *CROSS_DOMAIN_FORMATS, "imagefolder")

# Other spellings users type, TPT's set ids among them (I, A, V, R, K and the dataset names).
_ALIASES = {
    "i": "imagenet", "imagenet-val": "imagenet", "a": "imagenet-a", "v": "imagenet-v2",
    "imagenetv2": "imagenet-v2", "r": "imagenet-r", "k": "imagenet-sketch", "sketch": "imagenet-sketch",
    "flowers": "flower102", "oxford-flowers": "flower102", "oxford-pets": "pets", "oxfordpets": "pets",
    "stanford-cars": "cars", "stanfordcars": "cars", "fgvc-aircraft": "aircraft", "fgvcaircraft": "aircraft",
    "describable-textures": "dtd", "image-folder": "imagefolder",
}


def normalise_format(name: str) -> str:
    """Canonical format name for `name` (case-insensitive, `_` = `-`); InputError("--format") if unknown."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key != "auto" and key not in FORMATS:
        raise InputError("--format", name, f"unknown format; choose auto or one of {', '.join(FORMATS)}")
    return key


def is_cross_domain(fmt: str) -> bool:
    """True for the 10 cross-domain sets, where the reference TPT applies AugMix to its views."""
    return normalise_format(fmt) in CROSS_DOMAIN_FORMATS


def _format_of_split_file(path: Path) -> str:
    fmt = splits.FORMAT_OF_SPLIT_FILE.get(path.name)
    if fmt is None:
        raise InputError("--split-file", path, "is not one of CoOp's split_zhou_*.json files; pass --format")
    return fmt


def _detect_split(root: Path) -> str | None:
    found = sorted(name for name in splits.FORMAT_OF_SPLIT_FILE if (root / name).is_file())
    if len(found) > 1:
        raise InputError("--root", root, f"holds several split files ({', '.join(found)}); pass --format")
    return splits.FORMAT_OF_SPLIT_FILE[found[0]] if found else None


def _detect_folders(root: Path) -> str | None:
    names = set(subdirectories(root))
    if len(names) == 200 and names == set(classnames.subset_wnids("r")):
        return "imagenet-r"
    if len(names) == 200 and names == set(classnames.subset_wnids("a")):
        return "imagenet-a"
    if names == folders.NUMERIC_FOLDERS:
        return "imagenet-v2"
    if len(names) == 1000 and names == set(classnames.imagenet_wnids()):
        if "sketch" in root.name.lower():
            return "imagenet-sketch"
        _check_val_file_names(root)
        return "imagenet"
    return None


_VAL_PREFIX = "ILSVRC2012_val_"


def _check_val_file_names(root: Path) -> None:
    """1000 wnid folders in a root not named *sketch* are ImageNet's val set only if their files carry val's
    names; ImageNet-Sketch has the same folders (and names), and would otherwise fill the ImageNet column.

    Raises:
        InputError: the folders hold files and none of the first ones is named ILSVRC2012_val_*.
    """
    seen = []
    for folder in sorted(root.iterdir())[:20]:
        files = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        if any(name.startswith(_VAL_PREFIX) for name in files):
            return
        seen += files[:1]
    if seen:
        raise InputError("--format", "auto", f"{root} has the 1000 ImageNet wnid folders, but their files (e.g. "
                         f"{seen[0]}) are not named {_VAL_PREFIX}* as ImageNet's val images are; pass --format "
                         "imagenet-sketch or --format imagenet")


def _imagenet_like(root: Path) -> str | None:
    """Why `root` looks like an ImageNet-family tree (wnid or class-index folders), or None.

    Read as an imagefolder, such a tree would prompt with its folder names ("a photo of a n01443537.",
    "a photo of a 5."), which silently ruins every number; `auto` refuses it instead (see detect_format).
    """
    wnids = set(classnames.imagenet_wnids())
    for folder in (root, root / "val", root / "sketch", root / "images"):
        if not folder.is_dir():
            continue
        names = set(subdirectories(folder))
        hits = names & wnids
        if hits:
            return f"{len(hits)} of the {len(names)} folders in {folder} are ImageNet wnids"
        if names and names <= folders.NUMERIC_FOLDERS:
            return f"the {len(names)} folders in {folder} are ImageNet class indices"
    return None


def detect_format(root: Path, split_file: Path | None = None) -> str:
    """The format `auto` picks for `root` (see the module docstring).

    Raises:
        InputError: the tree looks like an ImageNet-family set (wnid or class-index folders) without being
            one complete set (a partial copy, a stray extra folder): `auto` would make it an imagefolder
            whose class names are the folder names, so the format must be named.
    """
    if split_file is not None:
        return _format_of_split_file(split_file)
    detected = _detect_split(root) or ("aircraft" if splits.aircraft_dir(root) else None)
    if detected:
        return detected
    for inner in ("val", "sketch", "images"):
        if (root / inner).is_dir() and _detect_folders(root / inner) in {"imagenet", "imagenet-sketch"}:
            if inner == "images" and "sketch" not in root.name.lower():
                continue  # 1000 wnid folders under images/: not a layout we know; _imagenet_like refuses it
            return "imagenet" if inner == "val" else "imagenet-sketch"
    detected = _detect_folders(root)
    if detected:
        return detected
    why = _imagenet_like(root)
    if why:
        raise InputError("--format", "auto", f"{why}, but they are not one complete ImageNet-family set; pass "
                         "--format imagenet, imagenet-a, imagenet-r, imagenet-v2 or imagenet-sketch to read it with "
                         "that set's labels and names (or --format imagefolder to prompt with the folder names)")
    return "imagefolder"


def _check_options(fmt: str, class_names_file: Path | None, split_file: Path | None) -> None:
    if class_names_file is not None and fmt != "imagefolder":
        raise InputError("--class-names", class_names_file, f"only applies to --format imagefolder (format is {fmt})")
    if split_file is not None and fmt not in SPLIT_FORMATS:
        raise InputError("--split-file", split_file, f"only applies to the CoOp split formats (format is {fmt})")


def open_layout(root: Path | str, fmt: str = "auto", *, class_names_file: Path | str | None = None,
                split_file: Path | str | None = None, follow_outside_links: bool = False) -> DatasetLayout:
    """Read `root` as format `fmt` (or detect it): class names and the entry stream, validated up front.

    Raises:
        NotFoundError: the root (or a named file) does not exist.
        InputError: unknown format, a tree that does not fit the format, a bad class-name or split file.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise NotFoundError("--root", root, "directory does not exist")
    root = root.resolve()
    names_file = Path(class_names_file).expanduser() if class_names_file is not None else None
    split = Path(split_file).expanduser().resolve() if split_file is not None else None
    fmt = normalise_format(fmt)
    if fmt == "auto":
        fmt = detect_format(root, split)
    _check_options(fmt, names_file, split)
    links = {"follow_outside_links": follow_outside_links}  # links leading outside the root (layouts.py)
    if fmt in {"imagenet", "imagenet-sketch"}:
        return folders.imagenet_layout(fmt, root, **links)
    if fmt in {"imagenet-a", "imagenet-r"}:
        return folders.imagenet_subset_layout(fmt, root, **links)
    if fmt == "imagenet-v2":
        return folders.imagenet_v2_layout(fmt, root, **links)
    if fmt in SPLIT_FORMATS:
        return splits.split_layout(fmt, root, split, **links)
    if fmt == "aircraft":
        return splits.aircraft_layout(root, **links)
    return folders.imagefolder_layout(root, names_file, **links)
