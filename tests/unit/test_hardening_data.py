"""Datasets stay inside their roots: split entries, symbolic links, loops, unreadable folders, empty classes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from PIL import Image

from difftpt_ops.core.errors import InputError
from difftpt_ops.data import layouts
from difftpt_ops.data.formats import open_layout
from difftpt_ops.data.scan import scan_layout
from difftpt_ops.services.running.generation import _DirectoryIndex

pytestmark = pytest.mark.unit


def _image(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(path)
    return path


def _scan(layout: layouts.DatasetLayout, tmp_path: Path) -> dict[str, str | None]:
    """relpath -> error (None when the sample is fine), as registration would store them."""
    with (tmp_path / "spool.jsonl").open("w+", encoding="utf-8") as spool:
        scan_layout(layout, spool, workers=1)
        spool.seek(0)
        return {row[1]: row[5] for row in map(json.loads, spool)}


@pytest.mark.parametrize("bad", ["../outside.jpg", "/etc/passwd", "a/../../outside.jpg", "C:/x.jpg"])
def test_split_entries_that_leave_the_root_are_refused(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "flowers"
    _image(root / "jpg" / "ok.jpg")
    (root / "split_zhou_OxfordFlowers.json").write_text(json.dumps({"test": [["ok.jpg", 0, "x"], [bad, 1, "y"]]}))
    with pytest.raises(InputError, match="test entry 1 leaves the dataset root") as caught:
        open_layout(root, "flower102")
    assert caught.value.argument == "--split-file"


def test_links_inside_the_root_are_followed_and_links_outside_are_failed_samples(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "ds", tmp_path / "elsewhere"
    _image(root / "cat" / "a.png")
    _image(root / "dog" / "b.png", 50)
    _image(elsewhere / "c.png", 90)
    _image(elsewhere / "more" / "d.png", 120)
    (root / "cat" / "same-as-b.png").symlink_to(root / "dog" / "b.png")
    (root / "cat" / "stolen.png").symlink_to(elsewhere / "c.png")
    (root / "dog" / "inner").symlink_to(root / "cat")
    (root / "dog" / "outer").symlink_to(elsewhere / "more")
    errors = _scan(open_layout(root, "imagefolder"), tmp_path)
    assert errors["cat/a.png"] is None and errors["cat/same-as-b.png"] is None and errors["dog/inner/a.png"] is None
    assert "leading outside the dataset root" in errors["cat/stolen.png"]
    assert "--follow-outside-links" in errors["dog/outer"] and "dog/outer/d.png" not in errors
    allowed = _scan(open_layout(root, "imagefolder", follow_outside_links=True), tmp_path)
    assert allowed["cat/stolen.png"] is None and allowed["dog/outer/d.png"] is None


def test_a_symlink_loop_is_detected_and_recorded(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _image(root / "cat" / "a.png")
    (root / "cat" / "again").symlink_to(root / "cat")
    (root / "cat" / "deeper").mkdir()
    (root / "cat" / "deeper" / "up").symlink_to(root)
    errors = _scan(open_layout(root, "imagefolder", follow_outside_links=True), tmp_path)
    assert "symbolic link loop" in errors["cat/again"] and "symbolic link loop" in errors["cat/deeper/up"]
    assert errors["cat/a.png"] is None and len(errors) == 3


def test_unreadable_folders_and_files_are_failed_samples_with_the_reason(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that cannot be listed (injected: the tests run as root) and a file that cannot be read (a socket)."""
    root = tmp_path / "ds"
    _image(root / "cat" / "a.png")
    _image(root / "cat" / "locked" / "b.png")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "cat" / "socket.png"))
        real_scandir = os.scandir

        def scandir(path: os.PathLike[str] | str) -> os.ScandirIterator[str]:
            if Path(path).name == "locked":
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(layouts.os, "scandir", scandir)
        errors = _scan(open_layout(root, "imagefolder"), tmp_path)
    assert errors["cat/a.png"] is None
    assert errors["cat/locked"].startswith("cannot list folder (PermissionError")
    assert errors["cat/socket.png"].startswith("cannot read file")


def test_a_folder_without_images_is_not_a_class(tmp_path: Path) -> None:
    """Documented choice: as torchvision's ImageFolder, an empty folder gets no label; the layout names it."""
    root = tmp_path / "ds"
    _image(root / "ant" / "a.png")
    (root / "bee" / "only-notes").mkdir(parents=True)
    (root / "bee" / "notes.txt").write_text("no images")
    _image(root / "cow" / "c.png")
    layout = open_layout(root, "imagefolder")
    assert layout.class_names == ("ant", "cow") and layout.empty_folders == ("bee",)
    assert [tuple(entry) for entry in layout] == [("ant/a.png", 0), ("cow/c.png", 1)]
    (root / "ant" / "a.png").unlink()
    (root / "cow" / "c.png").unlink()
    with pytest.raises(InputError, match="none of its 3 class folders holds an image"):
        open_layout(root, "imagefolder")


def test_imported_files_whose_links_lead_outside_the_import_root_are_left_out(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "generated", tmp_path / "elsewhere"
    _image(root / "cat" / "a_0.jpg")
    _image(elsewhere / "a_1.jpg")
    (root / "cat" / "a_1.jpg").symlink_to(elsewhere / "a_1.jpg")
    index = _DirectoryIndex(root)
    assert set(index.variants_of("cat/a.png", 4)) == {0} and index.outside_links == 1
    allowed = _DirectoryIndex(root, follow_outside_links=True)
    assert set(allowed.variants_of("cat/a.png", 4)) == {0, 1} and allowed.outside_links == 0


def test_a_root_that_cannot_be_listed_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing under it can be registered: refused with --root and the reason, not a traceback."""
    root = tmp_path / "ds"
    _image(root / "cat" / "a.png")
    real_scandir = os.scandir

    def scandir(path: os.PathLike[str] | str) -> os.ScandirIterator[str]:
        if Path(path) == root:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(layouts.os, "scandir", scandir)
    with pytest.raises(InputError, match="cannot list it .PermissionError: Permission denied") as caught:
        open_layout(root, "imagefolder")
    assert caught.value.argument == "--root"
