"""Dataset formats on tiny synthetic trees: labels, class names, relative paths, detection, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from difftpt_ops.core.errors import InputError, NotFoundError
from difftpt_ops.data import classnames
from difftpt_ops.data.formats import CROSS_DOMAIN_FORMATS, FORMATS, detect_format, is_cross_domain, open_layout

pytestmark = pytest.mark.unit


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> Path:
    """A tiny image; the suffix picks PNG or JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_folders(root: Path, names: list[str], per_folder: int = 2, suffix: str = ".png") -> Path:
    for name in names:
        for i in range(per_folder):
            write_image(root / name / f"img{i}{suffix}")
    return root


def entries_of(layout) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    return [tuple(entry) for entry in layout]  # type: ignore[misc]


# ImageFolder ---------------------------------------------------------------------------------------


def test_imagefolder_labels_follow_sorted_folder_names(tmp_path: Path) -> None:
    """Folders sorted as strings give labels 0..n-1 and are the class names; non-images are skipped."""
    root = make_folders(tmp_path / "ds", ["zebra", "ant", "moose"], per_folder=2)
    write_image(root / "ant" / "nested" / "deep.jpg")
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "ant" / ".hidden.png").write_bytes(b"")
    (root / "loose.png").write_bytes(b"")  # a file outside the class folders is not a sample
    layout = open_layout(root, "imagefolder")
    assert layout.class_names == ("ant", "moose", "zebra")
    assert entries_of(layout) == [
        ("ant/img0.png", 0), ("ant/img1.png", 0), ("ant/nested/deep.jpg", 0),
        ("moose/img0.png", 1), ("moose/img1.png", 1), ("zebra/img0.png", 2), ("zebra/img1.png", 2),
    ]
    assert layout.count() == 7 and not is_cross_domain("imagefolder")


def test_imagefolder_class_name_file_replaces_folder_names(tmp_path: Path) -> None:
    """One name per line, in sorted-folder order; blank lines ignored."""
    root = make_folders(tmp_path / "ds", ["c0", "c1"], per_folder=1)
    names = tmp_path / "names.txt"
    names.write_text("red panda\n\n  sea lion \n")
    assert open_layout(root, "imagefolder", class_names_file=names).class_names == ("red panda", "sea lion")


def test_imagefolder_class_name_file_with_wrong_count_is_rejected(tmp_path: Path) -> None:
    """A count mismatch names --class-names and the file."""
    root = make_folders(tmp_path / "ds", ["c0", "c1"], per_folder=1)
    names = tmp_path / "names.txt"
    names.write_text("only one\n")
    with pytest.raises(InputError) as info:
        open_layout(root, "imagefolder", class_names_file=names)
    assert info.value.argument == "--class-names" and "1 names" in str(info.value) and str(names) in str(info.value)
    with pytest.raises(NotFoundError, match="--class-names"):
        open_layout(root, "imagefolder", class_names_file=tmp_path / "missing.txt")


def test_missing_root_unknown_format_and_misplaced_options(tmp_path: Path) -> None:
    """Each bad argument is named with its value."""
    with pytest.raises(NotFoundError) as info:
        open_layout(tmp_path / "nope")
    assert info.value.argument == "--root"
    root = make_folders(tmp_path / "ds", ["a"], per_folder=1)
    with pytest.raises(InputError) as info:
        open_layout(root, "imagenet-z")
    assert info.value.argument == "--format" and info.value.value == "imagenet-z"
    names = tmp_path / "names.txt"
    names.write_text("x\n")
    with pytest.raises(InputError, match="--class-names"):
        open_layout(root, "imagenet", class_names_file=names)
    with pytest.raises(InputError, match="--split-file"):
        open_layout(root, "imagefolder", split_file=names)
    with pytest.raises(InputError, match="--root"):
        open_layout(tmp_path / "ds" / "a", "imagefolder")  # no class folders


# ImageNet family -----------------------------------------------------------------------------------


def test_imagenet_val_labels_are_imagenet_indices(tmp_path: Path) -> None:
    """A partial val/ tree keeps the full 1000-class labels; the root may be val/ itself."""
    wnids = classnames.imagenet_wnids()
    root = make_folders(tmp_path / "ImageNet" / "val", [wnids[0], wnids[417], wnids[999]], per_folder=1,
                        suffix=".JPEG")
    layout = open_layout(tmp_path / "ImageNet", "imagenet")
    assert len(layout.class_names) == 1000 and layout.class_names[0] == "tench"
    assert entries_of(layout) == [(f"val/{wnids[0]}/img0.JPEG", 0), (f"val/{wnids[417]}/img0.JPEG", 417),
                                  (f"val/{wnids[999]}/img0.JPEG", 999)]
    assert entries_of(open_layout(root, "imagenet"))[1] == (f"{wnids[417]}/img0.JPEG", 417)


def test_imagenet_rejects_a_folder_that_is_not_a_wnid(tmp_path: Path) -> None:
    """A wrong format for the tree is an error naming --root, not silent mislabelling."""
    root = make_folders(tmp_path / "ds", [classnames.imagenet_wnids()[3], "cats"], per_folder=1)
    with pytest.raises(InputError, match="'cats' is not a class of imagenet"):
        open_layout(root, "imagenet")


@pytest.mark.parametrize(("fmt", "variant", "first_index", "first_name"),
                         [("imagenet-a", "a", 6, "stingray"), ("imagenet-r", "r", 1, "goldfish")])
def test_imagenet_a_and_r_map_wnid_folders_to_imagenet_names(tmp_path: Path, fmt: str, variant: str,
                                                             first_index: int, first_name: str) -> None:
    """Label = position among the set's 200 sorted wnids; its name is the ImageNet name at that index."""
    indices = classnames.subset_indices(variant)
    wnids = classnames.imagenet_wnids()
    assert len(indices) == 200 and indices[0] == first_index
    chosen = [0, 57, 199]
    root = make_folders(tmp_path / fmt, [wnids[indices[label]] for label in chosen], per_folder=1, suffix=".jpg")
    layout = open_layout(root, fmt)
    assert len(layout.class_names) == 200 and layout.class_names[0] == first_name
    names = classnames.imagenet_names()
    for (relpath, label), expected in zip(entries_of(layout), chosen, strict=True):
        assert label == expected
        assert layout.class_names[label] == names[classnames.imagenet_index_of_wnid()[relpath.split("/")[0]]]


def test_imagenet_a_layout_rejects_imagenet_r_only_wnid(tmp_path: Path) -> None:
    """A wnid outside ImageNet-A is reported (wrong --format), not given a label."""
    a_set = set(classnames.subset_wnids("a"))
    r_only = next(w for w in classnames.subset_wnids("r") if w not in a_set)
    root = make_folders(tmp_path / "ds", [r_only], per_folder=1)
    with pytest.raises(InputError, match="not a class of imagenet-a"):
        open_layout(root, "imagenet-a")


def test_imagenet_v2_numeric_folders_pair_images_with_the_reference_names(tmp_path: Path) -> None:
    """label = int(folder), and class_names[label] equals the reference's permuted-name pairing."""
    folders = ["0", "1", "10", "100", "2", "999"]
    root = make_folders(tmp_path / "v2", folders, per_folder=1, suffix=".jpeg")
    layout = open_layout(root, "imagenet-v2")
    names = classnames.imagenet_names()
    assert layout.class_names == names
    # The reference: ImageFolder label j = position of the folder in string order, names permuted by
    # imagenet_v_mask = sorted(range(1000), key=str).
    string_order = sorted(str(i) for i in range(1000))
    reference_names = [names[int(folder)] for folder in string_order]
    for relpath, label in entries_of(layout):
        folder = relpath.split("/")[0]
        assert label == int(folder)
        assert layout.class_names[label] == reference_names[string_order.index(folder)]
    assert dict(entries_of(layout))["10/img0.jpeg"] == 10


def test_imagenet_sketch_accepts_the_inner_sketch_folder(tmp_path: Path) -> None:
    """ImageNet-Sketch's archive holds sketch/<wnid>; labels are ImageNet indices."""
    wnids = classnames.imagenet_wnids()
    make_folders(tmp_path / "ImageNet-Sketch" / "sketch", [wnids[5]], per_folder=1, suffix=".JPEG")
    layout = open_layout(tmp_path / "ImageNet-Sketch", "imagenet-sketch")
    assert entries_of(layout) == [(f"sketch/{wnids[5]}/img0.JPEG", 5)]


# Cross-domain sets ---------------------------------------------------------------------------------


def write_split(path: Path, test: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": [], "val": [], "test": test}))
    return path


def test_split_zhou_flowers_paths_labels_and_names(tmp_path: Path) -> None:
    """Test entries [path, label, classname] under jpg/; names from the shipped list in label order."""
    root = tmp_path / "Flower102"
    for name in ("image_00001.jpg", "image_00002.jpg"):
        write_image(root / "jpg" / name)
    write_split(root / "split_zhou_OxfordFlowers.json",
                [["image_00002.jpg", 5, "tiger lily"], ["image_00001.jpg", 0, "pink primrose"]])
    layout = open_layout(root)  # auto: the split file names the set
    assert layout.format == "flower102" and is_cross_domain("flower102")
    assert entries_of(layout) == [("jpg/image_00002.jpg", 5), ("jpg/image_00001.jpg", 0)]
    assert len(layout.class_names) == 102 and layout.class_names[5] == "tiger lily"
    assert layout.split_file == root / "split_zhou_OxfordFlowers.json"


def test_split_file_in_parent_or_passed_and_root_as_image_folder(tmp_path: Path) -> None:
    """Pets: the root may be the image folder itself; the split file may sit in the parent or be passed."""
    images = tmp_path / "oxford_pets" / "images"
    write_image(images / "Abyssinian_1.jpg")
    split = write_split(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json", [["Abyssinian_1.jpg", 0, "a"]])
    from_parent = open_layout(images, "pets")
    assert entries_of(from_parent) == [("Abyssinian_1.jpg", 0)] and from_parent.class_names[0] == "abyssinian"
    outer = open_layout(tmp_path / "oxford_pets", split_file=split)
    assert outer.format == "pets" and entries_of(outer) == [("images/Abyssinian_1.jpg", 0)]


def test_split_file_problems_name_the_argument(tmp_path: Path) -> None:
    """Missing split file, out-of-range label, images not under the root."""
    root = tmp_path / "dtd"
    write_image(root / "images" / "banded" / "b1.jpg")
    with pytest.raises(NotFoundError, match="--split-file=split_zhou_DescribableTextures.json"):
        open_layout(root, "dtd")
    write_split(root / "split_zhou_DescribableTextures.json", [["banded/b1.jpg", 47, "x"]])
    with pytest.raises(InputError, match="--split-file.*label 0..46"):
        open_layout(root, "dtd")
    write_split(root / "split_zhou_DescribableTextures.json", [["elsewhere/b1.jpg", 0, "banded"]])
    with pytest.raises(InputError, match="--root.*not under it"):
        open_layout(root, "dtd")
    # Another set's CoOp split file: its labels index that set's classes, not these names.
    pets_split = write_split(tmp_path / "split_zhou_OxfordPets.json", [["banded/b1.jpg", 0, "abyssinian"]])
    with pytest.raises(InputError, match="--split-file.*split file of pets, not of dtd"):
        open_layout(root, "dtd", split_file=pets_split)


def test_aircraft_label_is_the_row_in_variants(tmp_path: Path) -> None:
    """FGVC Aircraft: images_variant_test.txt lines 'id variant', label = row of the variant in variants.txt."""
    root = tmp_path / "fgvc_aircraft"
    names = classnames.cross_domain_names("aircraft")
    root.mkdir()
    (root / "variants.txt").write_text("\n".join(names) + "\n")
    (root / "images_variant_test.txt").write_text("1514522 707-320\n0062781 Boeing 717\n2224497 Yak-42\n")
    for image_id in ("1514522", "0062781", "2224497"):
        write_image(root / "images" / f"{image_id}.jpg")
    layout = open_layout(root)
    assert layout.format == "aircraft" and is_cross_domain("aircraft")
    assert entries_of(layout) == [("images/1514522.jpg", 0), ("images/0062781.jpg", 41), ("images/2224497.jpg", 99)]
    assert layout.class_names[41] == "Boeing 717"
    (root / "images_variant_test.txt").write_text("1514522 Concorde\n")
    with pytest.raises(InputError, match="'Concorde' is not in variants.txt"):
        open_layout(root, "aircraft")
    (root / "variants.txt").write_text("707-320\n")
    with pytest.raises(InputError, match="differ from the 100 FGVC Aircraft classes"):
        open_layout(root, "aircraft")


# Detection and names -------------------------------------------------------------------------------


def make_empty_folders(root: Path, names: list[str] | tuple[str, ...]) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
    return root


@pytest.mark.parametrize(("layout_kind", "expected"), [
    ("r", "imagenet-r"), ("a", "imagenet-a"), ("v2", "imagenet-v2"), ("in", "imagenet"), ("val", "imagenet"),
    ("sketch", "imagenet-sketch"), ("plain", "imagefolder"),
])
def test_auto_detection(tmp_path: Path, layout_kind: str, expected: str) -> None:
    """Full folder sets are recognised; other folder names make an ImageFolder."""
    wnids = classnames.imagenet_wnids()
    folder_sets = {
        "r": classnames.subset_wnids("r"), "a": classnames.subset_wnids("a"),
        "v2": [str(i) for i in range(1000)], "in": wnids, "plain": ["cat", "dog", "n0-not-a-wnid"],
    }
    root = tmp_path / "data"
    if layout_kind == "val":
        make_empty_folders(root / "val", wnids)
        (root / "train").mkdir()
    elif layout_kind == "sketch":
        make_empty_folders(root / "sketch", wnids)
    else:
        make_empty_folders(root, folder_sets[layout_kind])
    assert detect_format(root) == expected


def test_auto_asks_for_wnid_folders_of_unknown_files(tmp_path: Path) -> None:
    """1000 wnid folders in a root not named *sketch*: ImageNet when the files have val's names; else (a copy of
    ImageNet-Sketch renamed, say) `auto` asks rather than filing Sketch runs in the ImageNet column."""
    wnids = classnames.imagenet_wnids()
    val = tmp_path / "ilsvrc"
    make_empty_folders(val, wnids)
    write_image(val / wnids[0] / "ILSVRC2012_val_00000293.JPEG")
    assert detect_format(val) == "imagenet"
    other = tmp_path / "imagenet-k"
    make_empty_folders(other, wnids)
    write_image(other / wnids[0] / "n01440764_10026-1.JPEG")
    with pytest.raises(InputError, match=r"--format.*n01440764_10026-1.JPEG.*imagenet-sketch"):
        detect_format(other)
    assert open_layout(other, "imagenet-sketch").format == "imagenet-sketch"


def test_sketch_under_images_is_found_and_read_there(tmp_path: Path) -> None:
    """`imagenet-sketch/images/<wnid>/` (a TPT fork's layout) is ImageNet-Sketch to `auto`, and its images are read
    from images/; 1000 wnid folders under images/ of a root not named *sketch* are refused, not taken as one
    class called "images"."""
    wnids = classnames.imagenet_wnids()
    sketch = tmp_path / "imagenet-sketch"
    make_empty_folders(sketch / "images", wnids)
    assert detect_format(sketch) == "imagenet-sketch"
    unnamed = tmp_path / "data"
    make_empty_folders(unnamed / "images", wnids)
    with pytest.raises(InputError, match="--format"):
        detect_format(unnamed)
    few = tmp_path / "few-sketch"
    make_folders(few / "images", list(wnids[:3]), per_folder=1)
    layout = open_layout(few, "imagenet-sketch")
    names, index = classnames.imagenet_names(), classnames.imagenet_index_of_wnid()
    entries = entries_of(layout)
    assert len(layout.class_names) == 1000 and len(entries) == 3
    for relpath, label in entries:  # read from images/, labelled by their wnid
        assert relpath.startswith("images/") and label == index[relpath.split("/")[1]]
        assert layout.class_names[label] == names[label]


@pytest.mark.parametrize("layout_kind", ["partial-r", "r-plus-macosx", "partial-v2", "partial-val"])
def test_auto_refuses_an_incomplete_imagenet_family_tree(tmp_path: Path, layout_kind: str) -> None:
    """wnid or class-index folders that are not one full set would be an ImageFolder prompting with
    "a photo of a n01443537." or "a photo of a 5.": `auto` refuses and asks for the format; naming it works."""
    r_wnids = list(classnames.subset_wnids("r"))
    root = tmp_path / "data"
    fmt = {"partial-r": "imagenet-r", "r-plus-macosx": "imagenet-r", "partial-v2": "imagenet-v2",
           "partial-val": "imagenet"}[layout_kind]
    if layout_kind == "partial-r":
        make_folders(root, r_wnids[:10], per_folder=1)
    elif layout_kind == "r-plus-macosx":
        make_folders(root, r_wnids, per_folder=1)
        write_image(root / "__MACOSX" / r_wnids[0] / "._img0.png")  # a stray archive folder
    elif layout_kind == "partial-v2":
        make_folders(root, ["0", "5", "10", "999"], per_folder=1)
    else:
        make_folders(root / "val", r_wnids[:3], per_folder=1)
        (root / "train").mkdir()
    with pytest.raises(InputError, match="--format"):
        detect_format(root)
    with pytest.raises(InputError, match="--format"):
        open_layout(root)
    if layout_kind != "r-plus-macosx":  # named, the partial tree gets the full set's labels
        layout = open_layout(root, fmt)
        assert layout.format == fmt and len(layout.class_names) in (200, 1000)
    assert open_layout(root, "imagefolder").format == "imagefolder"  # still possible when asked for


def test_format_names_and_cross_domain_flags() -> None:
    """TPT's set ids and common spellings resolve; exactly the 10 cross-domain sets use AugMix."""
    assert len(CROSS_DOMAIN_FORMATS) == 10 and len(FORMATS) == 16
    assert [is_cross_domain(f) for f in ("A", "I", "V", "R", "K")] == [False] * 5
    assert all(is_cross_domain(f) for f in ("Flower102", "DTD", "Pets", "Cars", "UCF101", "Caltech101",
                                            "Food101", "SUN397", "Aircraft", "eurosat", "fgvc_aircraft"))
    expected_sizes = {"flower102": 102, "dtd": 47, "pets": 37, "cars": 196, "ucf101": 101, "caltech101": 100,
                      "food101": 101, "sun397": 397, "eurosat": 10, "aircraft": 100}
    assert {f: len(classnames.cross_domain_names(f)) for f in CROSS_DOMAIN_FORMATS} == expected_sizes
